"""The loss mask of supervised fine-tuning data, carried in the token ids themselves.

A token that is context only (a prompt, a system message, padding) is stored as `-(id + 1)`, a
trained one as its id, so that SFT data needs no second array anywhere: the shard codec, the
stream, the loader's workers, the pipeline engine's data iterator all move one integer array as
they do for pretraining data (whose ids are all ≥ 0, i.e. all trained). SFT shards are stored as
`int32` for the sign; `split_window` is the one place that reads the encoding back.

torch is imported where a tensor is handled, not here: data preparation (the CLI and its
worker processes) encodes with numpy alone and should not pay torch's import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # a target that is not trained (the model's cross-entropy skips it)
MASKED_DTYPE = "int32"  # the stored dtype of data that carries a loss mask


def encode(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Token ids (n,) and whether each is trained (n,) bool → the stored int32 array (n,)."""
    ids = ids.astype(np.int64)
    return np.where(trained, ids, -ids - 1).astype(MASKED_DTYPE)


def decode(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored array (n,) → token ids (n,) int64 and trained (n,) bool."""
    stored = stored.astype(np.int64)
    trained = stored >= 0
    return np.where(trained, stored, -stored - 1), trained


def split_window(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, s + 1) windows → inputs (b, s) as token ids and targets (b, s), where a target that is
    not trained is IGNORE_INDEX."""
    import torch

    ids = torch.where(batch >= 0, batch, -batch - 1)
    targets = batch[:, 1:]
    return ids[:, :-1], torch.where(targets >= 0, targets, IGNORE_INDEX)


def trained_tokens(batch: torch.Tensor) -> int:
    """How many targets of (b, s + 1) windows are trained."""
    return int((batch[:, 1:] >= 0).sum())


def loss_weights(counts: list[int], *, total: int, shares: int) -> list[float]:
    """Each micro-batch's factor on its mean loss, so that the mean of the factored losses over the
    `shares` micro-batches of a global batch (DeepSpeed's mean over gradient-accumulation steps and
    DP ranks) is the mean over all `total` trained targets of that batch: count × shares / total.

    `counts` are this rank's micro-batches' trained targets (`trained_tokens`). A micro-batch
    without one weighs 0, and so does every one when `total` is 0. The weight is exactly 1.0 when
    every micro-batch of the global batch has the same count (all pretraining data), so that a
    loss multiplied by it stays the same bit for bit."""
    if total == 0:
        return [0.0] * len(counts)
    return [count * shares / total for count in counts]
