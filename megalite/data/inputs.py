"""Input files → normalised document texts, streamed: the reading side of data preparation.

Supported inputs: `.txt` (a document per blank-line-separated paragraph, or per file),
`.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, the text in `text_field`) and
`.parquet` (the `text_field` column, read one record batch at a time). Every reader streams, so
a file larger than memory is fine. Bad data raises `DataError` naming the file and the line (jsonl)
or row (parquet); a damaged .gz/.zst/.parquet file names the file.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from megalite.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_KINDS = ".txt or .jsonl[.gz|.zst] or .parquet"  # for messages
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls but \t and \n
_READ_BYTES = 1 << 20  # compressed bytes per read
_PARQUET_ROWS = 1024  # rows per parquet record batch


def normalize(text: str) -> str:
    """Control characters other than newline and tab removed (so CRLF becomes LF), then NFC."""
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def input_suffix(path: Path) -> str | None:
    """The supported suffix `path` ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input specs → supported files: files as given, folders recursively and globs, each sorted;
    a file named twice is read once."""
    files = [f for spec in inputs for f in _expand(str(spec))]
    if not files:
        raise DataError("no input given")
    return list(dict.fromkeys(files))


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if input_suffix(path) is None:
            raise DataError(f"input {spec} is not a {_KINDS} file")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and input_suffix(p))
        if not found:
            raise DataError(f"input folder {spec} holds no {_KINDS} files")
        return found
    if glob.has_magic(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        wanted = [m for m in matches if Path(m).is_dir() or input_suffix(Path(m))]
        found = [f for m in wanted for f in _expand(m)]
        if not found:
            raise DataError(f"input pattern {spec} matches no {_KINDS} file")
        return found
    raise DataError(f"input path {spec} does not exist")


def json_lines(path: Path) -> Iterable[str] | None:
    """The lines of a .jsonl, .jsonl.gz or .jsonl.zst file (read lazily); None for another kind."""
    lines = {".jsonl": _text_lines, ".jsonl.gz": _gzip_lines, ".jsonl.zst": _zstd_lines}
    read = lines.get(input_suffix(path) or "")
    return None if read is None else read(path)


def read_texts(path: Path, *, txt_document: str, text_field: str) -> Iterator[str]:
    """The normalised documents of one input file, in file order (empty ones included)."""
    suffix = input_suffix(path)
    if suffix == ".txt":
        if txt_document == "paragraph":
            return _paragraphs(path)
        return iter([normalize(path.read_text(encoding="utf-8-sig", errors="replace"))])
    lines = json_lines(path)
    if lines is not None:
        return _jsonl_texts(path, lines, text_field)
    if suffix == ".parquet":
        return _parquet_texts(path, text_field)
    raise DataError(f"input {path} is not a {_KINDS} file")


def _paragraphs(path: Path) -> Iterator[str]:
    """Runs of non-blank lines; a line holding only whitespace counts as blank."""
    lines: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = normalize(line)
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip()
                lines = []
    if lines:
        yield "".join(lines).rstrip()


def _jsonl_texts(path: Path, lines: Iterable[str], field: str) -> Iterator[str]:
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(
                f"{path}:{line_no}: no {field!r} field (pick the field with --text-field)"
            )
        text = record[field]
        if not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(f"{path}:{line_no}: field {field!r} is {kind}, not a string")
        yield normalize(text)


def _text_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        yield from f


def _gzip_lines(path: Path) -> Iterator[str]:
    line_no = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8-sig", errors="replace") as f:
            for line_no, line in enumerate(f, 1):  # noqa: B007 (used in the message)
                yield line
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt gzip data after line {line_no} ({_reason(exc)})"
        ) from None


def _zstd_lines(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    rest = ""
    for chunk in _zstd_chunks(path):
        *lines, rest = (rest + decoder.decode(chunk)).split("\n")
        yield from lines
    rest += decoder.decode(b"", final=True)
    if rest:
        yield rest


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) zstd file. Uses `decompressobj`, which unlike
    `stream_reader` tells a cut-off last frame from a complete one."""
    import zstandard

    try:
        with open(path, "rb") as f:
            dobj, open_frame = zstandard.ZstdDecompressor().decompressobj(), False
            while data := f.read(_READ_BYTES):
                while data:
                    open_frame = True
                    yield dobj.decompress(data)
                    data = b""
                    if dobj.eof:  # a frame ended: the rest of `data` starts the next one
                        data, open_frame = dobj.unused_data, False
                        dobj = zstandard.ZstdDecompressor().decompressobj()
    except zstandard.ZstdError as exc:
        raise DataError(f"{path}: corrupt zstd data ({_reason(exc)})") from None
    if open_frame:
        raise DataError(f"{path}: corrupt zstd data (the last frame is cut short)")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if field not in schema.names:
            have = ", ".join(schema.names)
            raise DataError(f"{path}: no column {field!r} (columns: {have}; see --text-field)")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {field!r} is {kind}, not a string")
        for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise DataError(f"{path}: row {row}: field {field!r} is null, not a string")
                yield normalize(text)
    except (pa.ArrowException, OSError) as exc:
        reason = _reason(exc)
        raise DataError(f"{path}: not a readable parquet file after row {row} ({reason})") from None


def _reason(exc: BaseException) -> str:
    """A library's error message on one printable line."""
    text = "".join(c if c.isprintable() else " " for c in str(exc) or type(exc).__name__)
    return " ".join(text.split())
