"""prepare_data input formats: .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, and their errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megalite.data.cli import main
from megalite.data.errors import DataError
from megalite.data.inputs import find_inputs, read_texts
from megalite.data.prepare import prepare
from tests.data.datagen import make_texts, write_txt
from tests.data.helpers import folder_files, write_jsonl

TEXTS = make_texts(60, seed=7)


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_all_formats(folder: Path, texts: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = jsonl_bytes(texts)
    half = len(data) // 2  # two zstd frames, cut mid-line: the reader must join them
    zst = zstandard.ZstdCompressor().compress(data[:half])
    zst += zstandard.ZstdCompressor().compress(data[half:])
    paths = {
        "txt": write_txt(folder / "c.txt", texts),
        "jsonl": folder / "c.jsonl",
        "gz": folder / "c.jsonl.gz",
        "zst": folder / "c.jsonl.zst",
        "parquet": folder / "c.parquet",
    }
    paths["jsonl"].write_bytes(data)
    paths["gz"].write_bytes(gzip.compress(data, mtime=0))
    paths["zst"].write_bytes(zst)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), paths["parquet"],
                   row_group_size=7)  # fmt: skip
    return paths


def test_every_format_gives_the_same_tokens(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path / "in", TEXTS)
    for path in paths.values():
        assert list(read_texts(path, txt_document="paragraph", text_field="text")) == TEXTS
    outs = {}
    for kind, path in paths.items():
        prepare([path], tmp_path / kind, vocab_size=300, val_fraction=0.1, sample_tokens=32)
        outs[kind] = folder_files(tmp_path / kind)
    assert len(outs["txt"]) >= 4
    for kind in paths:
        assert outs[kind] == outs["txt"], kind


def test_folders_and_globs_find_every_format(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path / "in" / "sub", TEXTS[:5])
    (tmp_path / "in" / "notes.md").write_text("ignored")
    (tmp_path / "in" / "x.json.gz").write_bytes(b"ignored")
    assert find_inputs([tmp_path / "in"]) == sorted(paths.values())
    assert find_inputs([str(tmp_path / "in" / "*" / "c.*")]) == sorted(paths.values())
    m = prepare([tmp_path / "in"], tmp_path / "out", vocab_size=300, val_fraction=0.0)
    assert m.stats["input_files"] == 5 and m.stats["documents_read"] == 25
    assert m.stats["duplicates_dropped"] == 20


def corrupt_cases(d: Path) -> list[tuple[Path, str]]:
    data = jsonl_bytes(TEXTS)
    gz = gzip.compress(data, mtime=0)
    zst = zstandard.ZstdCompressor().compress(data)
    cases = {
        "cut.jsonl.gz": (gz[: len(gz) // 2], r"cut\.jsonl\.gz: corrupt gzip data"),
        "junk.jsonl.gz": (b"\x1f\x8b" + b"junk" * 50, r"junk\.jsonl\.gz: corrupt gzip data"),
        "cut.jsonl.zst": (zst[: len(zst) // 2], r"cut\.jsonl\.zst: corrupt zstd data"),
        "junk.jsonl.zst": (b"junk" * 50, r"junk\.jsonl\.zst: corrupt zstd data"),
        "junk.parquet": (b"PAR1" + b"junk" * 50, r"junk\.parquet: not a readable parquet"),
    }
    out = []
    for name, (raw, message) in cases.items():
        (d / name).write_bytes(raw)
        out.append((d / name, message))
    table = pa.table({"text": TEXTS})
    pq.write_table(table, d / "whole.parquet")
    raw = (d / "whole.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(raw[: len(raw) // 2] + raw[-8:])  # footer kept, data cut
    out.append((d / "cut.parquet", r"cut\.parquet: not a readable parquet"))
    pq.write_table(pa.table({"body": TEXTS}), d / "nofield.parquet")
    out.append((d / "nofield.parquet", r"nofield\.parquet: no column 'text' \(columns: body"))
    pq.write_table(pa.table({"text": list(range(3))}), d / "ints.parquet")
    out.append((d / "ints.parquet", r"ints\.parquet: column 'text' is int64, not a string"))
    pq.write_table(pa.table({"text": ["a", None]}), d / "null.parquet")
    out.append((d / "null.parquet", r"null\.parquet: row 2: field 'text' is null"))
    (d / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": 3}\n'))
    out.append((d / "bad.jsonl.gz", r"bad\.jsonl\.gz:2: field 'text' is int"))
    (d / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{'))
    out.append((d / "bad.jsonl.zst", r"bad\.jsonl\.zst:2: not valid JSON"))
    return out


def test_damaged_inputs_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = corrupt_cases(tmp_path)
    for path, message in cases:
        rc = main(["--input", str(path), "--output", str(tmp_path / "out"), "--vocab-size", "300"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, path
        assert err.startswith("prepare_data: error: ") and "\n" not in err, err
        assert re.search(message, err), err


def test_unsupported_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv is not a \.txt or \.jsonl"):
        find_inputs([tmp_path / "x.csv"])
    write_jsonl(tmp_path / "y.JSONL", [{"text": "upper-case suffix"}])
    assert find_inputs([tmp_path / "y.JSONL"]) == [tmp_path / "y.JSONL"]
