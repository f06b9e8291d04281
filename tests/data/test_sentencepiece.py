"""`--tokenizer x.model`: SentencePiece models, trained here on generated text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from megalite.data.cli import main
from megalite.data.manifest import load_manifest
from megalite.data.prepare import prepare
from megalite.data.stats import report
from tests.data.datagen import make_texts, write_txt
from tests.data.helpers import split_documents, train_sentencepiece

TEXTS = make_texts(80, seed=9)


def test_ids_are_sentencepiece_ids(tmp_path: Path) -> None:
    model = train_sentencepiece(tmp_path / "sp.model")
    src = write_txt(tmp_path / "in.txt", TEXTS)
    m = prepare([src], tmp_path / "out", tokenizer=model, val_fraction=0.2, sample_tokens=32)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (m.tokenizer, m.eod_token, m.eod_token_id) == ("tokenizer.model", "</s>", sp.eos_id())
    assert (m.vocab_size, m.dtype) == (120, "uint16")
    assert m.tokenizer_path.read_bytes() == model.read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["tokenizer"] == "tokenizer.model"
    expect = {text: sp.encode(text) for text in TEXTS}
    got = split_documents(tmp_path / "out", "train") + split_documents(tmp_path / "out", "val")
    assert sorted(got) == sorted(expect.values())
    text = report(tmp_path / "out", top=120)  # `stats` decodes with the folder's model
    assert "tokenizer tokenizer.model" in text and "'</s>'" in text and "'▁ka'" in text


def test_eod_token_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = train_sentencepiece(tmp_path / "noeos.model", eos_id=-1, user_defined_symbols=["<eod>"])
    src = write_txt(tmp_path / "in.txt", TEXTS[:10])
    args = ["--input", str(src), "--tokenizer", str(model), "--val-fraction", "0"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    assert "noeos.model has no EOS piece: name the end-of-document token with --eod-token" in (
        capsys.readouterr().err
    )
    assert main([*args, "--output", str(tmp_path / "b"), "--eod-token", "<nope>"]) == 2
    assert "has no end-of-document token '<nope>'" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "c"), "--eod-token", "<eod>"]) == 0
    m = load_manifest(tmp_path / "c")
    assert (m.eod_token, m.eod_token_id, m.split("train").documents) == ("<eod>", 2, 10)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    bad = ["--input", str(src), "--tokenizer", str(tmp_path / "bad.model")]
    assert main([*bad, "--output", str(tmp_path / "d")]) == 2
    assert "SentencePiece model" in capsys.readouterr().err
