"""data.document_mask: documents found from end-of-document tokens, and a packed window's logits
equal those of each of its documents run alone (attention and rotary positions per document)."""

from __future__ import annotations

from pathlib import Path

import torch

from megalite.config import ModelConfig, validate
from megalite.data.manifest import load_manifest
from megalite.model.documents import find_documents
from megalite.model.llama import Llama
from megalite.parallel.build import data_eod_id
from tests.helpers import compose_config

EOD = 3
CFG = ModelConfig(
    name="documents", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50,
    max_seq_len=64,
)  # fmt: skip


def test_segments_and_positions() -> None:
    tokens = torch.tensor([[5, EOD, 6, 7, EOD, 8], [EOD, 9, 9, 9, 9, EOD]])
    docs = find_documents(tokens, EOD)
    assert docs.segments.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    assert docs.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]
    assert docs.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 12] and docs.max_len == 5
    assert docs.mask[0, 0, 3].tolist() == [False, False, True, True, False, False]


def test_packed_window_equals_documents_alone() -> None:
    torch.manual_seed(0)
    model = Llama(CFG).eval()
    model.document_eod = EOD
    g = torch.Generator().manual_seed(1)
    lengths = [7, 12, 5]  # the last one runs to the window's end, without its EOD
    docs = [torch.randint(4, CFG.vocab_size, (n,), generator=g) for n in lengths]
    for doc in docs[:-1]:
        doc[-1] = EOD
    window = torch.cat(docs)[None]  # (1, 24)
    with torch.no_grad():
        packed = model(window)[0]  # (24, vocab)
        alone = torch.cat([model(doc[None])[0] for doc in docs])  # (24, vocab)
        model.document_eod = None
        unmasked = model(window)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (unmasked[7:] - alone[7:]).abs().max() > 1e-3  # without the mask, documents mix


def test_the_run_finds_its_end_of_document_id(sample_data: Path) -> None:
    cfg = compose_config([f"data.path={sample_data}", "data.document_mask=true"])
    assert data_eod_id(cfg) == load_manifest(sample_data).eod_token_id


def test_accepted_under_pipeline_parallelism() -> None:
    """The pipeline passes the documents between stages (tests/train/test_pipeline_documents)."""
    validate(compose_config(["data.document_mask=true", "parallel.pp=2", "parallel.dp=1"]))
