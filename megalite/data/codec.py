"""A shard's bytes: a WebDataset tar of one `<key>.tokens.npy` member per sample, written with
fixed metadata (the bytes depend on the tokens alone) and read back checked against the
manifest. Read with `tarfile` and a small tar/npy decoder, not webdataset: the stream wants a
whole shard in key order plus integrity checks, and importing webdataset would pull torch into
the data-preparation CLI."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from megalite.data.errors import DataError
from megalite.data.manifest import TOKENS_SUFFIX, ShardInfo


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
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read shard {path}: {exc.strerror}") from exc
    return decode_shard(data, info, dtype=dtype, name=str(path))


def decode_shard(data: bytes, info: ShardInfo, *, dtype: str, name: str) -> list[np.ndarray]:
    """The samples of a shard's bytes, in key order, as arrays of `dtype`.

    The bytes are checked against the manifest (sha256, sample and token counts) before and after
    decoding, so a truncated or overwritten shard raises `DataError` naming it (`name`: its path
    or URL) instead of yielding wrong tokens or stalling a reader.
    """
    found = hashlib.sha256(data).hexdigest()
    if found != info.sha256:
        raise DataError(
            f"shard {name} is corrupt ({len(data)} bytes, sha256 {found[:16]}…, the manifest's "
            f"{info.sha256[:16]}…): restore the file or prepare the data again"
        )
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


def _decode_tar(data: bytes, dtype: np.dtype) -> list[np.ndarray]:
    """Tar bytes → the samples in key order, as read-only views into `data` (no copies)."""
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


def _tar_members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar.

    The shards `shard_bytes` writes (plain USTAR headers, regular files) are parsed here directly,
    several times faster than `tarfile`, which sets the pace of streaming otherwise; anything
    else — another header type, a damaged header — goes to `tarfile`, which parses or rejects it.
    Only for bytes whose sha256 matched the manifest: header checksums are not checked here.
    """
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
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


def _tarfile_members(data: bytes) -> list[tuple[str, int, int]]:
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
