"""Mixtures of sources and sources named by shard patterns (local, pipe:): proportions, window
contents, exact resume (with another dp and other weights too), determinism, loader workers,
retries and the errors a user can cause.

The reference for a mixture window is its source read alone: the j-th window a mixture draws
from source k is window j of source k's own single-source stream.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megalite.data.errors import DataError
from megalite.data.loader import Loader
from megalite.data.mixture import SourceSpec, choose
from megalite.data.prepare import prepare
from megalite.data.shards import Retry, locate
from megalite.data.stream import TokenStream
from tests.data.datagen import SAMPLE_TOKENS, SHARD_TOKENS, make_texts, write_txt

SEED = 3
SEQ = 15
FAST = Retry(attempts=3, delay_s=0.0)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """A second dataset with small_data's tokenizer (a mixture needs one tokenizer)."""
    src = write_txt(tmp_path_factory.mktemp("other_src") / "o.txt", make_texts(150, seed=5))
    out = tmp_path_factory.mktemp("other_data")
    prepare([src], out, tokenizer=small_data / "tokenizer.json", val_fraction=0.1,
            sample_tokens=SAMPLE_TOKENS, shard_tokens=SHARD_TOKENS)  # fmt: skip
    return out


def mix(a: Path, b: Path, wa: float = 0.7, wb: float = 0.3) -> list[SourceSpec]:
    return [SourceSpec(str(a), wa, "a"), SourceSpec(str(b), wb, "b")]


def stream(sources: Any, split: str = "train", **kw: Any) -> TokenStream:
    args = {"seq_len": SEQ, "micro_batch_size": 4, "dp_rank": 0, "dp_size": 1, "seed": SEED}
    return TokenStream(sources, split, **(args | {"retry": FAST} | kw))


def take(s: Any, n: int) -> list[torch.Tensor]:
    return list(islice(iter(s), n))


def windows(batches: list[torch.Tensor]) -> list[np.ndarray]:
    return [w.numpy() for b in batches for w in b]


def single(root: Path, n: int) -> list[np.ndarray]:
    """The first n windows of root read alone."""
    return windows(take(stream(str(root), micro_batch_size=1), n))


def test_proportions_follow_the_weights() -> None:
    """50,000 draws: each source's share within 5 standard deviations of its weight."""
    weights = np.array([0.6, 0.3, 0.1])
    n = 50_000
    which = np.concatenate(
        [choose(np.cumsum(weights), SEED, first, 1000) for first in range(0, n, 1000)]
    )
    counts = np.bincount(which, minlength=3)
    sd = np.sqrt(n * weights * (1 - weights))
    assert np.all(np.abs(counts - n * weights) < 5 * sd), counts
    assert np.array_equal(which[:1000], choose(np.cumsum(weights), SEED, 0, 1000))
    assert not np.array_equal(which[:1000], choose(np.cumsum(weights), SEED + 1, 0, 1000))


def test_windows_are_each_sources_own_windows(small_data: Path, other_data: Path) -> None:
    n = 120
    got = windows(take(stream(mix(small_data, other_data)), n // 4))
    which = choose(np.cumsum([0.7, 0.3]), SEED, 0, n)
    refs = [single(small_data, n), single(other_data, n)]
    seen = [0, 0]
    for window, k in zip(got, which, strict=True):
        assert np.array_equal(window, refs[k][seen[k]])
        seen[k] += 1
    s = stream(mix(small_data, other_data))
    take(s, n // 4)
    assert s.windows_drawn() == {"a": seen[0], "b": seen[1]} and 0 < seen[1] < seen[0]


def test_runs_are_deterministic_and_seeded(small_data: Path, other_data: Path) -> None:
    a = torch.cat(take(stream(mix(small_data, other_data)), 10))
    assert torch.equal(a, torch.cat(take(stream(mix(small_data, other_data)), 10)))
    assert not torch.equal(a, torch.cat(take(stream(mix(small_data, other_data), seed=4), 10)))


def test_exact_resume_across_epochs(small_data: Path, other_data: Path) -> None:
    """Resume after enough rounds that the smaller source is in its second epoch."""
    per_epoch = stream(str(other_data)).sources[0].total // (SEQ + 1)  # windows of b
    k = math.ceil(1.5 * per_epoch / 0.3 / 4)  # rounds of 4 windows: b drew ~1.5 epochs
    expected = take(stream(mix(small_data, other_data)), k + 8)[k:]
    first = stream(mix(small_data, other_data))
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sources"]["b"]["epoch"] >= 1 and state["window"] == 4 * k
    resumed = stream(mix(small_data, other_data))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 8), expected, strict=True))


@pytest.mark.parametrize(("dp_before", "dp_after"), [(2, 4), (4, 1)])
def test_resume_with_another_dp_neither_repeats_nor_skips(
    small_data: Path, other_data: Path, dp_before: int, dp_after: int
) -> None:
    """Global batch 8 windows: dp × mb = 8 before and after; the windows after the switch are
    exactly those a single rank reads next."""
    k, m = 7, 5
    reference = windows(take(stream(mix(small_data, other_data), micro_batch_size=8), k + m))
    saver = [stream(mix(small_data, other_data), micro_batch_size=8 // dp_before,
                    dp_rank=r, dp_size=dp_before) for r in range(dp_before)]  # fmt: skip
    for s in saver:
        take(s, k)
    state = saver[-1].state_dict()
    after = [stream(mix(small_data, other_data), micro_batch_size=8 // dp_after,
                    dp_rank=r, dp_size=dp_after) for r in range(dp_after)]  # fmt: skip
    for s in after:
        s.load_state_dict(state)
    per_rank = [take(s, m) for s in after]
    got = [w for step in zip(*per_rank, strict=True) for b in step for w in b.numpy()]
    assert all(np.array_equal(x, y) for x, y in zip(got, reference[8 * k :], strict=True))


def test_new_weights_on_resume_continue_each_source(
    small_data: Path, other_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = stream(mix(small_data, other_data))
    take(first, 10)
    drawn = first.windows_drawn()
    resumed = stream(mix(small_data, other_data, 0.2, 0.8))
    with caplog.at_level(logging.INFO):
        resumed.load_state_dict(first.state_dict())
    assert "weight 0.8 on resume (was 0.3)" in caplog.text
    got = windows(take(resumed, 10))
    which = choose(np.cumsum([0.2, 0.8]), SEED, 40, 40)
    refs = [single(small_data, 200), single(other_data, 200)]
    seen = [drawn["a"], drawn["b"]]
    for window, k in zip(got, which, strict=True):
        assert np.array_equal(window, refs[k][seen[k]])
        seen[k] += 1


def test_weights_normalised_and_zero_weight_left_out(
    small_data: Path, other_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        s = stream(mix(small_data, other_data, 7, 3))
    assert "sum to 10: normalised" in caplog.text
    assert [spec.weight for spec in s.specs] == pytest.approx([0.7, 0.3])
    assert torch.equal(take(s, 3)[2], take(stream(mix(small_data, other_data)), 3)[2])
    with caplog.at_level(logging.WARNING):
        s = stream(mix(small_data, other_data, 1.0, 0.0))
    assert "'b' has weight 0: it is left out" in caplog.text and s.names == ["a"]
    assert torch.equal(torch.cat(take(s, 3)), torch.cat(take(stream(str(small_data)), 3)))


@pytest.mark.parametrize(
    ("weights", "message"),
    [((0.0, 0.0), "every data source has weight 0"), ((1.0, -1.0), "weight -1.0")],
)
def test_bad_weights_raise(small_data: Path, other_data: Path, weights: tuple, message: str):
    with pytest.raises(DataError, match=message):
        stream(mix(small_data, other_data, *weights))


def test_sources_errors(small_data: Path, tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match="no source"):
        stream([])
    with pytest.raises(DataError, match="two data sources are named 'a'"):
        stream([SourceSpec(str(small_data), 1, "a"), SourceSpec(str(small_data), 1, "a")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no prepared data"):
        stream(mix(small_data, tmp_path / "empty"))
    other_tok = tmp_path / "other_tok"
    prepare([corpus], other_tok, vocab_size=280, sample_tokens=SAMPLE_TOKENS)
    with pytest.raises(DataError, match="different tokenizers: prepare every source with"):
        stream(mix(small_data, other_tok))


def test_state_of_other_sources_raises(small_data: Path, other_data: Path) -> None:
    saved = stream(mix(small_data, other_data))
    take(saved, 2)
    with pytest.raises(DataError, match="other prepared data"):
        stream(str(small_data)).load_state_dict(saved.state_dict())


def test_val_mixture_leaves_out_sources_without_val(small_data: Path, tmp_path: Path) -> None:
    src = write_txt(tmp_path / "t.txt", make_texts(40, seed=9))
    no_val = tmp_path / "no_val"
    prepare([src], no_val, tokenizer=small_data / "tokenizer.json", val_fraction=0.0,
            sample_tokens=SAMPLE_TOKENS, shard_tokens=SHARD_TOKENS)  # fmt: skip
    val = stream(mix(small_data, no_val), "val", shuffle=False)
    assert val.names == ["a"]
    assert torch.equal(take(val, 2)[1], take(stream(str(small_data), "val", shuffle=False), 2)[1])


# ---- shard patterns ------------------------------------------------------------------------


def test_patterns_read_the_same_tokens_as_the_folder(small_data: Path) -> None:
    n = len(list((small_data / "train").glob("shard-*.tar")))
    local = f"{small_data}/train/shard-{{000000..{n - 1:06d}}}.tar"
    piped = f"pipe:cat {local}"
    folder = torch.cat(take(stream(str(small_data)), 30))
    for spec in (local, piped):
        assert torch.equal(torch.cat(take(stream(spec), 30)), folder), spec
    val = torch.cat(take(stream(piped, "val", shuffle=False), 3))
    assert torch.equal(val, torch.cat(take(stream(str(small_data), "val", shuffle=False), 3)))


def test_pattern_selects_a_subset_of_shards(small_data: Path) -> None:
    loc = locate(f"{small_data}/train/shard-{{000002..000004}}.tar")
    assert [info.path for _, info in loc.split("train")] == [
        f"train/shard-{i:06d}.tar" for i in (2, 3, 4)
    ]
    assert loc.data_id != locate(str(small_data)).data_id
    with pytest.raises(DataError, match="not a train shard listed"):
        locate(f"{small_data}/train/shard-{{000000..009999}}.tar")
    with pytest.raises(DataError, match="names no shard of a prepared folder"):
        locate(f"pipe:cat {small_data}/train/data-{{0..2}}.tar")


@pytest.mark.parametrize(
    "first",
    [
        "exit 1",  # the command fails
        'head -c 1000 "$1"; exit 0',  # a partial download: the sha256 differs, retried too
    ],
)
def test_flaky_reads_are_retried(small_data: Path, tmp_path: Path, first: str) -> None:
    """A command that fails, or gives part of the file, on its first call for each file: every
    read succeeds on a retry."""
    script = tmp_path / "flaky.sh"
    script.write_text(
        f'm={tmp_path}/$(echo "$1" | tr / _); [ -e "$m" ] || {{ touch "$m"; {first}; }}; cat "$1"\n'
    )
    n = len(list((small_data / "train").glob("shard-*.tar")))
    flaky = f"pipe:sh {script} {small_data}/train/shard-{{000000..{n - 1:06d}}}.tar"
    got = torch.cat(take(stream(flaky), 40))
    assert torch.equal(got, torch.cat(take(stream(str(small_data)), 40)))


def test_unreadable_shard_is_reported_by_name(small_data: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    victim = root / "train" / "shard-000003.tar"
    victim.unlink()
    n = len(list((root / "train").glob("shard-*.tar"))) + 1
    spec = f"pipe:cat {root}/train/shard-{{000000..{n - 1:06d}}}.tar"
    said = rf"cannot read shard pipe:cat {victim} \(3 attempts\): command exited with status 1: "
    with pytest.raises(DataError, match=said + "cat: .*No such file"):
        take(stream(spec, shuffle=False), 10_000)


# ---- loader workers ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_stream_and_its_state(
    small_data: Path, other_data: Path, workers: int
) -> None:
    import functools

    make = functools.partial(stream, mix(small_data, other_data), dp_rank=1, dp_size=2)
    expected = take(make(), 14)
    loader = Loader(make, workers=workers, prefetch=2)
    got = take(loader, 9)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=False))
    reference = make()
    take(reference, 9)
    assert loader.state_dict() == reference.state_dict()
    resumed = Loader(make, workers=workers)
    resumed.load_state_dict(loader.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 5), expected[9:], strict=True))


def test_worker_error_is_one_line(small_data: Path, tmp_path: Path) -> None:
    import functools

    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    victim = root / "train" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:100])
    loader = Loader(functools.partial(stream, str(root), shuffle=False), workers=1)
    with pytest.raises(DataError) as err:
        take(loader, 10_000)
    assert "\n" not in str(err.value) and str(victim) in str(err.value)
