"""A shard's bytes: a WebDataset tar of one `<key>.tokens.npy` member per sample, written with
fixed metadata (the bytes depend on the tokens alone) and read back checked against the
manifest. Read with a small tar/npy decoder, not webdataset: the stream wants a whole shard in
key order plus integrity checks, and importing webdataset would pull torch into the
data-preparation CLI. The shards the writer writes are decoded with a few numpy operations per
shard (`_decode_regular`), anything else member by member, with `tarfile` for tar headers the
writer never writes (`_decode_members`): both give the same samples or the same error. A shard's
bytes are checked by the checksum its manifest entry names (`ShardInfo.checksum`: xxh3-64 since
format 2, sha256 before), hashed while they are read (`read_hashed`)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np
import xxhash

from megalite.data.errors import DataError
from megalite.data.manifest import TOKENS_SUFFIX, ShardInfo

Buffer: TypeAlias = bytes | bytearray | memoryview


def shard_bytes(samples: list[np.ndarray], *, first_key: int) -> bytes:
    """A WebDataset tar with one `<key>.tokens.npy` member per sample, keys counting up from
    `first_key`. Fixed metadata (mtime 0, uid/gid 0, no user names) makes the bytes depend on the
    tokens alone."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, sample, allow_pickle=False)
            info = tarfile.TarInfo(f"{first_key + i:09d}.{TOKENS_SUFFIX}")
            info.size, info.mtime, info.mode = npy.tell(), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            npy.seek(0)
            tar.addfile(info, npy)
    return buf.getvalue()


def read_shard(path: Path, info: ShardInfo, *, dtype: str) -> list[np.ndarray]:
    """All samples of one local shard, in key order, as arrays of `dtype` (see `decode_shard`)."""
    try:
        data = read_hashed(path, info.checksum[0])
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc.strerror}") from exc
    return decode_shard(data, info, dtype=dtype, name=str(path))


class Hashed(np.ndarray):
    """A file's bytes (uint8) and their checksum (`checksum`: algorithm, hex digest), computed as
    they were read. An array, not a bytearray: numpy allocates it without zeroing, which costs as
    much as the read itself."""

    checksum: tuple[str, str] = ("", "")


class _Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...

    def hexdigest(self) -> str: ...


_HASHERS: dict[str, Callable[[], _Hasher]] = {"sha256": hashlib.sha256, "xxh3_64": xxhash.xxh3_64}
_THREADED = {"sha256"}  # slower than a read (~1 GB/s): hashed in a thread while the next is read
_CHUNK = 4 << 20  # bytes read (and hashed) at a time


def hexdigest(algorithm: str, data: Buffer) -> str:
    """The `algorithm` (a `ShardInfo.checksum` algorithm) hex digest of `data`."""
    hasher = _HASHERS[algorithm]()
    hasher.update(data)
    return hasher.hexdigest()


def read_hashed(path: str | Path, algorithm: str = "sha256") -> Hashed:
    """The bytes of a local file and their `algorithm` checksum, read into one array sized by
    `fstat`.

    Each chunk is hashed as it is read: sha256 in a thread while the next chunk is read (hashlib
    and file reads release the GIL), so checking a shard costs about its read, not its read plus
    its hash; xxh3, 10× faster, in line while the chunk is in cache. A file whose size changes
    during the read raises OSError (a reader retries it)."""
    hasher = _HASHERS[algorithm]()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = np.empty(size, dtype=np.uint8).view(Hashed)
        if algorithm in _THREADED:
            with _hashing_thread(hasher) as update:
                pos = _read_into(f, data.data, update)
        else:
            pos = _read_into(f, data.data, hasher.update)
        if pos != size or f.read(1):
            raise OSError(errno.EIO, f"{path} changed size while being read (was {size} bytes)")
    data.checksum = (algorithm, hasher.hexdigest())
    data.flags.writeable = False  # the samples are views of it
    return data


def _read_into(f: io.FileIO, view: memoryview, update: Callable[[memoryview], None]) -> int:
    """Fill `view` from `f` a chunk at a time, each chunk handed to `update` once read; the
    bytes read (fewer than `view` holds if the file ends first)."""
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos : pos + _CHUNK])
        if not n:
            break
        update(view[pos : pos + n])
        pos += n
    return pos


@contextmanager
def _hashing_thread(hasher: _Hasher) -> Iterator[Callable[[memoryview], None]]:
    """A function that queues chunks for `hasher`, which a thread updates with them; every
    queued chunk is hashed when the block ends."""
    chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()

    def hash_chunks() -> None:
        while (chunk := chunks.get()) is not None:
            hasher.update(chunk)

    thread = threading.Thread(target=hash_chunks, daemon=True)
    thread.start()
    try:
        yield chunks.put
    finally:
        chunks.put(None)
        thread.join()


def decode_shard(
    data: Buffer | Hashed, info: ShardInfo, *, dtype: str, name: str
) -> list[np.ndarray]:
    """The samples of a shard's bytes, in key order, as arrays of `dtype`.

    The bytes are checked against the manifest (checksum: `ShardInfo.checksum`; sample and token
    counts) before and after decoding, so a truncated or overwritten shard raises `DataError`
    naming it (`name`: its path or URL) instead of yielding wrong tokens or stalling a reader.
    `Hashed` bytes bring their checksum along.
    """
    algorithm, expected = info.checksum
    brought = data.checksum if isinstance(data, Hashed) else None
    data = data.data if isinstance(data, Hashed) else data
    found = brought[1] if brought and brought[0] == algorithm else hexdigest(algorithm, data)
    if found != expected:
        raise DataError(_corrupt(data, info, name, algorithm=algorithm, found=found))
    try:
        samples = _decode_tar(data, np.dtype(dtype))
    except Exception as exc:  # tarfile/numpy raise many types for damaged bytes
        raise DataError(f"shard {name} is corrupt: {exc}") from exc
    tokens = sum(len(s) for s in samples)
    if len(samples) != info.samples or tokens != info.tokens:
        raise DataError(
            f"shard {name} holds {len(samples)} samples / {tokens} tokens, "
            f"the manifest says {info.samples} / {info.tokens}"
        )
    return samples


def _corrupt(data: Buffer, info: ShardInfo, name: str, *, algorithm: str, found: str) -> str:
    """The message for bytes whose `algorithm` digest `found` is not the manifest's. It names
    the sha256s, the bytes' identity whichever checksum caught them (the bytes' is computed
    here: a failing read is rare); the xxh3s only where the sha256s agree (a manifest edited by
    hand)."""
    if algorithm != "sha256":
        sha = hexdigest("sha256", data)
        if sha != info.sha256:
            algorithm, found = "sha256", sha
    expected = dict([info.checksum, ("sha256", info.sha256)])[algorithm]
    return (
        f"shard {name} is corrupt ({len(data)} bytes, {algorithm} {found[:16]}…, the manifest's "
        f"{expected[:16]}…): restore the file or prepare the data again"
    )


def _decode_tar(data: Buffer, dtype: np.dtype) -> list[np.ndarray]:
    """Tar bytes → the samples in key order, as read-only views into `data` (no copies)."""
    samples = _decode_regular(data, dtype)
    return samples if samples is not None else _decode_members(data, dtype)


def _decode_members(data: Buffer, dtype: np.dtype) -> list[np.ndarray]:
    """`_decode_tar` member by member: any tar `tarfile` reads, any .npy numpy reads."""
    members: list[tuple[str, np.ndarray]] = []
    headers: dict[bytes, tuple[bytes, tuple[int, ...], np.dtype]] = {}
    view = memoryview(data)
    for name, start, size in _tar_members(data):
        key, _, suffix = name.partition(".")
        if suffix != TOKENS_SUFFIX:
            raise ValueError(f"unexpected member {name!r}")
        raw = view[start : start + size]
        if len(raw) != size:
            raise ValueError(f"member {name!r} is cut short")
        array = _decode_npy(raw, headers)
        if array.dtype != dtype or array.ndim != 1:
            raise ValueError(f"member {name!r} is {array.dtype}{list(array.shape)}")
        members.append((key, array))
    members.sort(key=lambda m: m[0])
    return [array for _, array in members]


def _tar_members(data: Buffer) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar.

    The shards `shard_bytes` writes (plain USTAR headers, regular files) are parsed here directly,
    several times faster than `tarfile`, which sets the pace of streaming otherwise; anything
    else — another header type, a damaged header — goes to `tarfile`, which parses or rejects it.
    Only for bytes whose sha256 matched the manifest: header checksums are not checked here.
    """
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = bytes(data[pos : pos + 512])
        if header == _ZERO_BLOCK:
            return out
        if header[257:263] != b"ustar\x00" or header[156:157] not in (b"0", b"\x00") or header[345]:
            break  # not the plain USTAR file header we write
        try:  # (no header checksum: the caller has checked the whole file's sha256)
            size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
        except ValueError:
            break
        name = header[:100].rstrip(b"\x00").decode("utf-8")
        out.append((name, pos + 512, size))
        pos += 512 + -(-size // 512) * 512
    return _tarfile_members(data)


def _tarfile_members(data: Buffer) -> list[tuple[str, int, int]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                raise ValueError(f"unexpected member {info.name!r}")
            out.append((info.name, info.offset_data, info.size))
    return out


_ZERO_BLOCK = bytes(512)


def _decode_npy(
    raw: memoryview, headers: dict[bytes, tuple[bytes, tuple[int, ...], np.dtype]]
) -> np.ndarray:
    """.npy bytes → array. All full samples of a shard share one header, so each distinct header
    is parsed once (numpy's parser costs more than the copy-free decode itself). `headers` maps
    each header to (header, shape, dtype), and b"" to the previous member's entry."""
    last = headers.get(b"")  # the previous member's header: the common case, compared in place
    if last is not None and raw[: len(last[0])] == last[0]:
        header = last[0]
        return np.frombuffer(raw, dtype=last[2], offset=len(header)).reshape(last[1])
    if bytes(raw[:8]) != b"\x93NUMPY\x01\x00":  # not format 1.0: let numpy handle it
        return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    end = 10 + int.from_bytes(raw[8:10], "little")
    header = bytes(raw[:end])
    if header not in headers:
        f = io.BytesIO(header)
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        if fortran or dtype.hasobject:
            raise ValueError("unsupported .npy layout")
        headers[header] = (header, shape, dtype)
    _, shape, dtype = headers[header]
    headers[b""] = headers[header]
    return np.frombuffer(raw[end:], dtype=dtype).reshape(shape)


_MAGIC = np.frombuffer(b"ustar\x00", dtype=np.uint8)
_SUFFIX = np.frombuffer(b"." + TOKENS_SUFFIX.encode(), dtype=np.uint8)
_NAME = re.compile(rb"[0-9]+\." + re.escape(TOKENS_SUFFIX.encode()))  # what the writer names


def _decode_regular(data: Buffer, dtype: np.dtype) -> list[np.ndarray] | None:
    """`_decode_tar` for what `shard_bytes` writes, without a Python step per member; None for
    anything else (left to `_decode_members`, which parses or rejects it as it always has).

    Such a tar is a few runs of members of one size — the full samples, then a shorter last
    one — laid out every `stride` bytes, each a plain USTAR header named `<digits>.tokens.npy`
    and a .npy of one header. Each run's first member is parsed in Python; the rest of the run
    is the longest stretch of members whose header fields and .npy header equal the first's,
    compared at once as rows of a (members, stride) byte matrix, and its samples are the rows of
    a strided (members, tokens) view. The keys must rise (file order is key order)."""
    u8 = np.frombuffer(data, dtype=np.uint8)
    u8.flags.writeable = False  # the samples of a writable buffer are read-only too
    runs: list[np.ndarray] = []  # (members, tokens) views
    keys: list[np.ndarray] = []  # (members,) bytes
    pos, end = 0, len(u8)
    while pos + 512 <= end:
        header = bytes(data[pos : pos + 512])
        if header == _ZERO_BLOCK:
            break
        first = _regular_member(data, pos, dtype)
        if first is None:
            return None
        size, npy_len, name_len = first
        stride = 512 + -(-size // 512) * 512
        rows = u8[pos : pos + (end - pos) // stride * stride].reshape(-1, stride)
        key_len = name_len - len(_SUFFIX)
        same = (
            (rows[:, 124:136] == rows[0, 124:136]).all(axis=1)  # size
            & (rows[:, 156] == rows[0, 156])  # type: a regular file
            & (rows[:, 257:263] == _MAGIC).all(axis=1)
            & (rows[:, 345] == 0)  # no name prefix
            & (rows[:, 512 : 512 + npy_len] == rows[0, 512 : 512 + npy_len]).all(axis=1)
            & (rows[:, key_len:name_len] == _SUFFIX).all(axis=1)
            & (rows[:, name_len:100] == 0).all(axis=1)
            & ((rows[:, :key_len] - ord("0")) < 10).all(axis=1)  # digits (uint8 wraps below)
        )
        n = len(same) if same.all() else int(np.argmin(same))
        if n == 0:  # the member's blocks run past the end: a cut tar
            return None
        start = 512 + npy_len
        runs.append(rows[:n, start : 512 + size].view(dtype))
        keys.append(np.ascontiguousarray(rows[:n, :key_len]).view(f"S{key_len}")[:, 0])
        pos += n * stride
    else:
        return None  # no end-of-archive block: left to tarfile
    if not runs:
        return []
    ordered = np.concatenate(keys) if len(keys) > 1 else keys[0]
    if not (ordered[1:] > ordered[:-1]).all():
        return None  # keys out of order or repeated: sorted by `_decode_members`
    return [sample for run in runs for sample in run]


def _regular_member(data: Buffer, pos: int, dtype: np.dtype) -> tuple[int, int, int] | None:
    """(size, .npy header length, name length) of the member whose header is at `pos` if it is
    one `shard_bytes` writes — a plain USTAR file `<digits>.tokens.npy` holding a whole .npy 1.0
    of one dimension and `dtype` — else None."""
    header = bytes(data[pos : pos + 512])
    if header[257:263] != b"ustar\x00" or header[156:157] not in (b"0", b"\x00") or header[345]:
        return None
    try:
        size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
    except ValueError:
        return None
    name = header[:100].rstrip(b"\x00")
    if not _NAME.fullmatch(name) or b"\x00" in name or pos + 512 + size > len(data):
        return None
    npy = bytes(data[pos + 512 : pos + 512 + min(size, 65_536)])
    if npy[:8] != b"\x93NUMPY\x01\x00" or len(npy) < 10:
        return None
    npy_len = 10 + int.from_bytes(npy[8:10], "little")
    try:
        f = io.BytesIO(npy[:npy_len])
        np.lib.format.read_magic(f)
        shape, fortran, found = np.lib.format.read_array_header_1_0(f)
    except Exception:  # numpy raises several types for bad headers: left to `_decode_members`
        return None
    if fortran or found != dtype or len(shape) != 1 or npy_len + shape[0] * dtype.itemsize != size:
        return None
    return size, npy_len, len(name)
