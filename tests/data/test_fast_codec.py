"""The fast shard decoder (`codec._decode_regular`) against the member-by-member one it stands in
for, hashing while reading, and the stream's read-ahead of the next shard."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from megalite.data import codec
from megalite.data import source as source_module
from megalite.data.errors import DataError
from megalite.data.manifest import ShardInfo, load_manifest
from megalite.data.stream import TokenStream

U16 = np.dtype("uint16")


def samples(lengths: list[int], *, dtype: str = "uint16", seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, n).astype(dtype) for n in lengths]


def outcome(fn: Callable[[], list[np.ndarray]]) -> tuple[Any, ...]:
    """What `fn` gives, comparable: the samples' dtypes and bytes, or the error's type and text."""
    try:
        return ("ok", [(s.dtype.str, s.shape, s.tobytes()) for s in fn()])
    except Exception as exc:
        return ("error", type(exc), str(exc))


def same_as_slow(data: bytes, dtype: np.dtype = U16) -> tuple[Any, ...]:
    """`_decode_tar`'s outcome, asserted equal to the member-by-member decoder's."""
    fast = outcome(lambda: codec._decode_tar(data, dtype))
    assert fast == outcome(lambda: codec._decode_members(data, dtype))
    return fast


def tar_of(members: list[tuple[str, bytes]], *, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, array, allow_pickle=False)
    return f.getvalue()


@pytest.mark.parametrize(
    "lengths",
    [[], [5], [64] * 50, [64] * 50 + [17], [64] * 3 + [0], [0, 0], [30, 64, 64, 2, 2, 9]],
)
@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32"])
def test_fast_path_reads_what_the_writer_writes(lengths: list[int], dtype: str) -> None:
    written = samples(lengths, dtype=dtype)
    data = codec.shard_bytes(written, first_key=7)
    fast = codec._decode_regular(data, np.dtype(dtype))
    assert fast is not None  # no fallback for the writer's own shards
    assert outcome(lambda: fast) == outcome(lambda: codec._decode_members(data, np.dtype(dtype)))
    assert all(
        np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, written, strict=True)
    )
    assert all(not s.flags.writeable for s in fast)
    # key digits roll over (9 → 10 digits: "1000000000" sorts before "999999999" as text)
    same_as_slow(codec.shard_bytes(written, first_key=10**9 - 2))


def test_fast_path_views_a_writable_buffer_read_only() -> None:
    data = codec.shard_bytes(samples([8, 8]), first_key=0)
    for buffer in (bytearray(data), np.frombuffer(data, np.uint8).copy(), memoryview(data)):
        decoded = codec._decode_regular(buffer, U16)
        assert decoded is not None and not decoded[0].flags.writeable


@pytest.mark.parametrize("cut", [1, 100, 511, 512, 600, 1024, 4000, -1536, -1024, -512, -1])
def test_truncated_tar_fails_or_reads_as_before(cut: int) -> None:
    data = codec.shard_bytes(samples([300] * 6 + [11]), first_key=0)
    same_as_slow(data[:cut])


@pytest.mark.parametrize("at", [0, 3, 6])
def test_a_member_with_another_npy_header(at: int) -> None:
    """Another dtype, byte order or shape in one member: the same samples or the same error."""
    base = samples([40] * 7)
    for odd in (
        base[at].astype(np.uint32),
        base[at].astype(">u2"),
        base[at].reshape(4, 10),
        np.asfortranarray(base[at].reshape(4, 10)),
        base[at][:0],
    ):
        members = [(f"{i:09d}.tokens.npy", npy(odd if i == at else s)) for i, s in enumerate(base)]
        same_as_slow(tar_of(members))


def test_npy_format_2_and_padding_differences() -> None:
    base = samples([40] * 5)
    f = io.BytesIO()
    np.lib.format.write_array(f, base[2], version=(2, 0), allow_pickle=False)
    members = [(f"{i:09d}.tokens.npy", npy(s)) for i, s in enumerate(base)]
    members[2] = (members[2][0], f.getvalue())
    assert same_as_slow(tar_of(members))[0] == "ok"
    members[2] = (members[2][0], npy(base[2]) + b"\x00" * 2)  # trailing bytes after the data
    assert same_as_slow(tar_of(members))[0] == "error"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_fall_back_to_tarfile(fmt: int) -> None:
    """pax and GNU long-name headers (the writer never writes them) go to tarfile."""
    base = samples([20] * 4)
    members = [(f"{i:09d}.tokens.npy", npy(s)) for i, s in enumerate(base)]
    members[1] = ("9" * 120 + ".tokens.npy", members[1][1])
    data = tar_of(members, fmt=fmt)
    assert codec._decode_regular(data, U16) is None
    assert same_as_slow(data)[0] == "ok"


@pytest.mark.parametrize(
    "names",
    [
        ["000000002", "000000001", "000000003"],  # out of order: sorted by key
        ["000000001", "000000001", "000000002"],  # a repeated key
        ["a", "b", "c"],  # not digits
        ["000000001", "000000002.x", "000000003"],  # another suffix
        ["dir/000000001", "dir/000000002", "dir/000000003"],
    ],
)
def test_odd_member_names_decode_as_before(names: list[str]) -> None:
    base = samples([16] * 3)
    members = [
        (name if "." in name else f"{name}.tokens.npy", npy(s))
        for name, s in zip(names, base, strict=True)
    ]
    same_as_slow(tar_of(members))


def test_other_member_types_decode_as_before() -> None:
    base = samples([16] * 3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, s in enumerate(base):
            payload = npy(s)
            info = tarfile.TarInfo(f"{i:09d}.tokens.npy")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("000000009.tokens.npy")
        link.type, link.linkname = tarfile.SYMTYPE, "000000000.tokens.npy"
        tar.addfile(link)
    assert same_as_slow(buf.getvalue())[0] == "error"
    assert same_as_slow(b"not a tar file " * 100)[0] == "error"
    assert same_as_slow(bytes(1024)) == ("ok", [])


def test_no_end_of_archive_block_goes_to_tarfile() -> None:
    data = codec.shard_bytes(samples([64] * 3), first_key=0)
    bare = data[: 3 * (512 + 512 * -(-(128 + 128) // 512))]  # the members, no zero blocks
    assert codec._decode_regular(bare, U16) is None
    same_as_slow(bare)


@pytest.mark.parametrize("size", [0, 1000, 3 * 4096 + 5])
def test_read_hashed(tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "_CHUNK", 4096)  # several chunks through the hashing thread
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(payload)
    data = codec.read_hashed(path)
    assert bytes(data) == payload and data.checksum == (
        "sha256",
        hashlib.sha256(payload).hexdigest(),
    )
    assert not data.flags.writeable
    with pytest.raises(OSError):
        codec.read_hashed(tmp_path / "missing")


def test_read_hashed_fails_on_a_file_that_changes_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fstat = codec.os.fstat
    for change in (-10, 10):  # as if it grew, or shrank, after fstat
        monkeypatch.setattr(
            codec.os, "fstat", lambda fd, c=change: SimpleNamespace(st_size=fstat(fd).st_size + c)
        )
        with pytest.raises(OSError, match="changed size while being read"):
            codec.read_hashed(path)


def test_decode_shard_checks_the_read_hash(tmp_path: Path) -> None:
    data = codec.shard_bytes(samples([10] * 3), first_key=0)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    info = ShardInfo("s.tar", 3, 0, 30, hashlib.sha256(data).hexdigest())
    assert len(codec.read_shard(path, info, dtype="uint16")) == 3
    read = codec.read_hashed(path)
    read.checksum = ("sha256", "0" * 64)  # what a read of other bytes would bring
    with pytest.raises(DataError, match="is corrupt .* sha256 0000000000000000…"):
        codec.decode_shard(read, info, dtype="uint16", name=str(path))


def stream(root: Path, **kw: Any) -> TokenStream:
    args: dict[str, Any] = dict(seq_len=4, micro_batch_size=1, dp_rank=0, dp_size=1, seed=3)
    return TokenStream(str(root), "train", **(args | kw))


def test_read_ahead_gives_the_same_tokens(
    small_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads of 5 tokens cross 8-sample shards in many steps: the next shard is read in a thread,
    and the tokens are those of a stream that reads every shard when it gets there."""
    threads: list[str] = []
    read = source_module.read_shard_at

    def spy(*args: Any, **kwargs: Any) -> list[np.ndarray]:
        threads.append(threading.current_thread().name)
        return read(*args, **kwargs)

    monkeypatch.setattr(source_module, "read_shard_at", spy)
    n = load_manifest(small_data).tokens("train") // 5 + 40  # into epoch 1
    s = stream(small_data)
    ahead = [s.next_batch() for _ in range(n)]
    assert any(name != threading.main_thread().name for name in threads)
    monkeypatch.setattr(source_module.Source, "_read_ahead", lambda self, *a, **k: None)
    threads.clear()
    s = stream(small_data)
    plain = [s.next_batch() for _ in range(n)]
    assert all(name == threading.main_thread().name for name in threads)
    assert all((a == b).all() for a, b in zip(ahead, plain, strict=True))


def test_read_ahead_error_surfaces_when_the_shard_is_used(tmp_path: Path, small_data: Path) -> None:
    import shutil

    root = Path(shutil.copytree(small_data, tmp_path / "data"))
    m = load_manifest(root)
    victim = m.shards("train")[1]
    victim.write_bytes(victim.read_bytes()[:700])
    s = stream(root, shuffle=False)
    per_shard = m.split("train").shards[0].tokens // 5
    for _ in range(per_shard - 1):  # shard 0 only (shard 1 is read ahead, and fails)
        s.next_batch()
    with pytest.raises(DataError, match=f"shard {victim} is corrupt"):
        for _ in range(per_shard):
            s.next_batch()


def test_corrupt_member_count_is_reported(tmp_path: Path) -> None:
    data = codec.shard_bytes(samples([10] * 3), first_key=0)
    info = ShardInfo("s.tar", 3, 0, 30, hashlib.sha256(data).hexdigest())
    with pytest.raises(DataError, match="holds 3 samples / 30 tokens, the manifest says 4"):
        codec.decode_shard(data, replace(info, samples=4), dtype="uint16", name="s")
