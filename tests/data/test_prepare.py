"""tools/prepare_data.py and megalite.data.prepare: determinism, format, normalisation, errors."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer, models, pre_tokenizers

from megalite.data.cli import main
from megalite.data.codec import read_shard
from megalite.data.errors import DataError
from megalite.data.manifest import load_manifest
from megalite.data.prepare import normalize, prepare
from tests.data.datagen import SAMPLE_TOKENS, SHARD_TOKENS, make_texts, write_txt
from tests.helpers import run_python

REPO = Path(__file__).resolve().parents[2]


def split_tokens(root: Path, split: str) -> list[np.ndarray]:
    """Every sample of a split, shard by shard, in stored order."""
    m = load_manifest(root)
    pairs = zip(m.shards(split), m.split(split).shards, strict=True)
    return [s for path, info in pairs for s in read_shard(path, info, dtype=m.dtype)]


def documents(root: Path, split: str) -> list[str]:
    """The split's documents decoded back to text (the stream cut at each EOD token)."""
    m = load_manifest(root)
    tok = Tokenizer.from_file(str(m.tokenizer_path))
    flat = np.concatenate(split_tokens(root, split)).tolist()
    out, start = [], 0
    for i, t in enumerate(flat):
        if t == m.eod_token_id:
            out.append(tok.decode(flat[start:i], skip_special_tokens=False))
            start = i + 1
    assert start == len(flat), "every split ends with an EOD token"
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_identical_input_gives_byte_identical_output(tmp_path: Path, corpus: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["--input", str(corpus), "--output", str(out), "--vocab-size", "400"]
        rc = main(
            [*args, "--sample-tokens", "48", "--shard-tokens", "400", "--val-fraction", "0.1"]
        )
        assert rc == 0
    files = [sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) for out in outs]
    assert files[0] == files[1] and len(files[0]) > 5
    for rel in files[0]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_manifest_contents(small_data: Path, corpus: Path) -> None:
    m = load_manifest(small_data)
    raw = json.loads((small_data / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["tokenizer"] == "tokenizer.json"
    assert (m.dtype, m.eod_token, m.eod_token_id, m.vocab_size) == (
        "uint16",
        "<|endoftext|>",
        0,
        300,
    )
    assert (m.sample_tokens, m.shard_tokens, m.seed) == (SAMPLE_TOKENS, SHARD_TOKENS, 0)
    assert m.stats == {
        "input_files": 1,
        "documents_read": 400,
        "empty_dropped": 0,
        "duplicates_dropped": 0,
        "documents_kept": 400,
    }
    assert m.split("val").documents >= 1
    assert m.split("train").documents + m.split("val").documents == 400
    for split in ("train", "val"):
        info = m.split(split)
        assert raw["splits"][split]["tokens"] == info.tokens == m.tokens(split)
        names = [f"{split}/shard-{i:06d}.tar" for i in range(len(info.shards))]
        assert [s.path for s in info.shards] == names
        assert all(s.samples == 8 for s in info.shards[:-1])
        samples = split_tokens(small_data, split)
        assert all(len(s) == SAMPLE_TOKENS for s in samples[:-1]) and 0 < len(samples[-1]) <= 48
        flat = np.concatenate(samples)
        assert len(flat) == info.tokens and flat.dtype == np.uint16
        assert int((flat == m.eod_token_id).sum()) == info.documents
    assert len(m.split("train").shards) > 10


def test_documents_round_trip(small_data: Path, corpus: Path) -> None:
    texts = make_texts(400)
    train, val = documents(small_data, "train"), documents(small_data, "val")
    assert sorted(train + val) == sorted(texts)
    assert [t for t in texts if t in set(val)] == val  # each split keeps the input order


def test_normalisation_and_dedup(tmp_path: Path) -> None:
    records = [
        {"text": "line one\r\nline two"},  # CRLF → LF
        {"text": "nul\x00 and bell\x07 removed\ttab kept"},
        {"text": "cafe\u0301"},  # NFD → NFC "café"
        {"text": "caf\u00e9"},  # duplicate of the previous one once normalised
        {"text": ""},
        {"text": "  \n "},
        {"text": "\x00\x01"},  # empty once control characters are removed
        {"text": "line one\r\nline two"},  # exact duplicate
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    m = prepare([src], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    assert m.stats["documents_read"] == 8
    assert m.stats["empty_dropped"] == 3 and m.stats["duplicates_dropped"] == 2
    assert m.split("train").documents == 3
    got = documents(tmp_path / "out", "train")
    assert got == ["line one\nline two", "nul and bell removed\ttab kept", "caf\u00e9"]
    assert normalize("a\u0085b\x7fc\r") == "abc"
    assert unicodedata.is_normalized("NFC", normalize("e\u0301"))


def test_literal_eod_text_is_not_an_eod_token(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a <|endoftext|> b"}, {"text": "c"}])
    m = prepare([src], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    assert documents(tmp_path / "out", "train") == ["a <|endoftext|> b", "c"]
    assert m.split("train").documents == 2


def test_txt_paragraph_and_file_documents(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("first para\nstill first\n\nsecond\n \t \n\n\nthird\n", encoding="utf-8")
    para = prepare([src], tmp_path / "p", vocab_size=300, val_fraction=0.0)
    assert para.stats["documents_read"] == 3
    assert documents(tmp_path / "p", "train") == ["first para\nstill first", "second", "third"]
    whole = prepare([src], tmp_path / "f", vocab_size=300, val_fraction=0.0, txt_document="file")
    assert whole.stats["documents_read"] == 1


def test_token_dtype_follows_vocab_size(tmp_path: Path, corpus: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000, "[UNK]": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    src = write_txt(tmp_path / "in.txt", ["w1 w69999 w5", "w70 zzz"])
    m = prepare([src], tmp_path / "out", tokenizer=tmp_path / "big.json", val_fraction=0.0)
    assert (m.dtype, m.vocab_size, m.eod_token_id) == ("uint32", 70_002, 70_000)
    (sample,) = split_tokens(tmp_path / "out", "train")
    assert sample.dtype == np.uint32
    assert sample.tolist() == [1, 69_999, 5, 70_000, 70, 70_001, 70_000]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        tmp_path / "big.json"
    ).read_bytes()


def test_folder_glob_and_jsonl_inputs(tmp_path: Path) -> None:
    texts = make_texts(12, seed=3)
    write_txt(tmp_path / "in" / "b" / "two.txt", texts[4:8])
    write_txt(tmp_path / "in" / "a.txt", texts[:4])
    (tmp_path / "in" / "notes.md").write_text("ignored")
    write_jsonl(tmp_path / "extra" / "x.jsonl", [{"body": t} for t in texts[8:]])
    m = prepare(
        [tmp_path / "in", str(tmp_path / "extra" / "*.jsonl"), tmp_path / "in" / "a.txt"],
        tmp_path / "out",
        vocab_size=300,
        val_fraction=0.0,
        text_field="body",
    )
    assert m.stats["input_files"] == 3 and m.stats["documents_read"] == 12
    assert documents(tmp_path / "out", "train") == texts  # folder sorted: a.txt, then b/two.txt


def test_val_split_is_never_empty_and_can_be_disabled(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "in.txt", ["alpha beta", "gamma delta"])
    m = prepare([src], tmp_path / "a", vocab_size=300, val_fraction=1e-9)
    assert (m.split("train").documents, m.split("val").documents) == (1, 1)
    m = prepare([src], tmp_path / "b", vocab_size=300, val_fraction=0.0)
    assert list(m.splits) == ["train"]
    with pytest.raises(DataError, match="no split 'val'"):
        m.shards("val")


def test_preparing_again_removes_stale_shards(tmp_path: Path, corpus: Path) -> None:
    prepare([corpus], tmp_path, vocab_size=300, sample_tokens=64, shard_tokens=640)
    many = len(list((tmp_path / "train").glob("*.tar")))
    m = prepare([corpus], tmp_path, vocab_size=300, sample_tokens=64, shard_tokens=10**6)
    assert len(list((tmp_path / "train").glob("*.tar"))) == len(m.split("train").shards) == 1 < many


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--input", str(d / "nope.txt")], "input path .*nope.txt does not exist"),
        (lambda d: ["--input", str(d / "empty")], "folder .*empty holds no .txt or .jsonl"),
        (lambda d: ["--input", str(d / "*.zip")], "matches no .txt or .jsonl"),
        (lambda d: ["--input", str(d / "blank.txt")], "no documents found"),
        (lambda d: ["--input", str(d / "bad.jsonl")], r"bad.jsonl:2: no 'text' field"),
        (
            lambda d: ["--input", str(d / "ok.txt"), "--tokenizer", str(d / "t.json")],
            "tokenizer file .*t.json does not exist",
        ),
        (lambda d: ["--input", str(d / "ok.txt"), "--vocab-size", "100"], "too small"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_args: Callable[[Path], list[str]],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"content": "no text"}])
    write_txt(tmp_path / "ok.txt", ["hello world"])
    rc = main([*make_args(tmp_path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("prepare_data: error: ") and "\n" not in err
    assert re.search(message, err), err


def test_tokenizer_and_vocab_size_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--input", "x", "--output", "y", "--tokenizer", "t.json", "--vocab-size", "300"])
    assert rc == 2 and "not allowed with" in capsys.readouterr().err


def test_tool_runs_from_the_repo_root(tmp_path: Path, corpus: Path, small_data: Path) -> None:
    """Also checks BPE training is deterministic across processes and thread counts: one rayon
    thread here against the default pool in `small_data` (same text and vocab)."""
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--output", str(out), "--vocab-size", "300"]
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    proc = run_python(
        "tools/prepare_data.py", *args, "--sample-tokens", "256", env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "400 read" in proc.stdout
    assert "tokenising" in proc.stderr  # the progress bar
    assert load_manifest(out).samples("train") > 0
    tokenizer = (out / "tokenizer.json").read_bytes()
    assert tokenizer == (small_data / "tokenizer.json").read_bytes()


def test_shards_are_webdataset_readable(small_data: Path) -> None:
    m = load_manifest(small_data)
    url = str(m.shards("val")[0])
    got = [
        (s["__key__"], s["tokens.npy"]) for s in wds.WebDataset(url, shardshuffle=False).decode()
    ]
    assert [k for k, _ in got] == [f"{i:09d}" for i in range(m.shard_samples("val")[0])]
    assert all(
        np.array_equal(a, b)
        for (_, a), b in zip(got, split_tokens(small_data, "val"), strict=False)
    )
