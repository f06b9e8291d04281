"""Tokenizers for data preparation: a byte-level BPE trained here, an existing `tokenizer.json`
(Hugging Face tokenizers) or a SentencePiece `*.model`, behind one small interface.

A tokenizer travels as the bytes of its file (`TokenizerFile`): that is what is copied into the
prepared folder, what the resume fingerprint covers, and what worker processes rebuild their
`Encoder` from. SentencePiece models are encoded with the sentencepiece library itself, so the ids
are exactly what `SentencePieceProcessor.encode` gives.

`--tokenizer` may also name a folder (a Hugging Face model folder, or a checkpoint folder that
`tools/convert.py from-hf` wrote): its tokenizer.json, else its tokenizer.model, with the EOS,
BOS and chat template of its tokenizer_config.json (`TokenizerConfig`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.errors import DataError
from megalite.data.manifest import TOKENIZER_NAME

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte tokens plus the end-of-document token
SENTENCEPIECE_NAME = "tokenizer.model"
_TRAIN_BATCH = 512  # texts per batch handed to the BPE trainer


@dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer as file bytes; `kind` is "hf" (tokenizer.json) or "sentencepiece"."""

    kind: str
    data: bytes
    eod_token: str | None  # None: the SentencePiece model's EOS piece

    @property
    def name(self) -> str:
        """The file name in a prepared folder."""
        return SENTENCEPIECE_NAME if self.kind == "sentencepiece" else TOKENIZER_NAME


@dataclass(frozen=True)
class TokenizerConfig:
    """What a model folder's tokenizer_config.json (and chat_template.jinja) says beyond the
    tokenizer file: the special tokens a chat template refers to, and the template itself."""

    eos_token: str | None = None
    bos_token: str | None = None
    chat_template: str | None = None


def load_tokenizer(path: Path, *, eod_token: str | None) -> TokenizerFile:
    """Read a tokenizer file: `*.model` is SentencePiece, anything else a tokenizer.json.
    Checks that it loads and has the end-of-document token (`Encoder` raises otherwise)."""
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    kind = "sentencepiece" if path.suffix.lower() == ".model" else "hf"
    if kind == "hf" and eod_token is None:
        eod_token = EOD_TOKEN
    tokenizer = TokenizerFile(kind, path.read_bytes(), eod_token)
    Encoder(tokenizer, source=str(path))
    return tokenizer


def find_tokenizer(path: Path) -> tuple[Path, TokenizerConfig]:
    """`--tokenizer PATH` → the tokenizer file and the config beside it. A file is itself (no
    config: today's behaviour); a folder gives its tokenizer.json, else its tokenizer.model, and
    its tokenizer_config.json."""
    if not path.is_dir():
        return path, TokenizerConfig()
    for name in (TOKENIZER_NAME, SENTENCEPIECE_NAME):
        if (path / name).is_file():
            return path / name, read_tokenizer_config(path)
    raise DataError(f"tokenizer folder {path} holds no {TOKENIZER_NAME} or {SENTENCEPIECE_NAME}")


def read_tokenizer_config(folder: Path) -> TokenizerConfig:
    """`folder`'s tokenizer_config.json (absent: all None). A special token may be written as a
    string or as an AddedToken dict with "content"; the template may also be chat_template.jinja
    beside it (transformers ≥ 4.43 saves it there)."""
    path = folder / "tokenizer_config.json"
    raw: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc})") from None
    template = raw.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return TokenizerConfig(
        eos_token=_token_content(raw.get("eos_token")),
        bos_token=_token_content(raw.get("bos_token")),
        chat_template=template if isinstance(template, str) else None,
    )


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def train_tokenizer(texts: Iterator[str], *, vocab_size: int, eod_token: str) -> TokenizerFile:
    """Byte-level BPE with `eod_token` as its only special token (id 0).

    Deterministic: the trainer breaks ties between equally frequent pairs by token ids, which
    come from the sorted byte alphabet, so the merges do not depend on thread count or hash order
    (checked by preparing twice and comparing tokenizer.json bytes).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return TokenizerFile("hf", tok.to_str(pretty=True).encode(), eod_token)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _TRAIN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class Encoder:
    """Text → token ids with a `TokenizerFile`. `threads=1` keeps it to one core (in a worker);
    None lets the library use its own thread pool. A special token written in the text is text,
    unless `parse_special` (for a rendered chat template, whose markers are special tokens; a
    tokenizer.json only: the sentencepiece library cannot)."""

    def __init__(
        self,
        tokenizer: TokenizerFile,
        *,
        threads: int | None = None,
        source: str = "",
        parse_special: bool = False,
    ):
        self.kind, self.threads = tokenizer.kind, threads
        source = source or tokenizer.name
        if tokenizer.kind == "sentencepiece":
            self._sp = _load_sentencepiece(tokenizer.data, source)
            self.eod_token, self.eod_id = _sentencepiece_eod(self._sp, tokenizer.eod_token, source)
            self.vocab_size = int(self._sp.get_piece_size())
        else:
            self._hf = _load_hf(tokenizer.data, source)
            self.eod_token = tokenizer.eod_token or EOD_TOKEN
            eod_id = self._hf.token_to_id(self.eod_token)
            if eod_id is None:
                raise DataError(
                    f"tokenizer has no end-of-document token {self.eod_token!r} (see --eod-token)"
                )
            self.eod_id = int(eod_id)
            self._hf.encode_special_tokens = not parse_special  # else "<|endoftext|>" is text
            vocab = self._hf.get_vocab(with_added_tokens=True).values()
            self.vocab_size = max(vocab) + 1  # ids may have gaps

    @property
    def dtype(self) -> np.dtype:
        """The smallest stored token dtype for this vocabulary."""
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids (no special tokens added), as int64 arrays."""
        if self.kind == "sentencepiece":
            threads = -1 if self.threads is None else self.threads
            ids: list[Any] = self._sp.encode(texts, out_type=int, num_threads=threads)
        else:
            encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
            ids = [e.ids for e in encodings]
        return [np.asarray(i, dtype=np.int64) for i in ids]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included (as text)."""
        if self.kind == "sentencepiece":
            return str(self._sp.decode(list(ids)))
        return str(self._hf.decode(list(ids), skip_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        """A readable form of one token: its piece for SentencePiece, its decoded text else."""
        if self.kind == "sentencepiece":
            return str(self._sp.id_to_piece(token_id))
        return str(self._hf.decode([token_id], skip_special_tokens=False))


def _load_hf(data: bytes, source: str) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode())
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise DataError(f"tokenizer file {source} cannot be loaded: {exc}") from exc


def _load_sentencepiece(data: bytes, source: str) -> Any:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as exc:  # RuntimeError or OSError, depending on the damage
        raise DataError(f"SentencePiece model {source} cannot be loaded: {exc}") from exc
    return sp


def _sentencepiece_eod(sp: Any, eod_token: str | None, source: str) -> tuple[str, int]:
    if eod_token is None:
        eos = int(sp.eos_id())
        if eos < 0:
            raise DataError(
                f"SentencePiece model {source} has no EOS piece: "
                "name the end-of-document token with --eod-token"
            )
        return str(sp.id_to_piece(eos)), eos
    token_id = int(sp.piece_to_id(eod_token))
    if sp.id_to_piece(token_id) != eod_token:  # piece_to_id gives the unknown id for a miss
        raise DataError(
            f"SentencePiece model {source} has no end-of-document token {eod_token!r} "
            "(see --eod-token)"
        )
    return eod_token, token_id


@dataclass(frozen=True)
class EncodeTask:
    """Encode a batch of texts with the tokenizer file at `path`: a small picklable job for
    `Workers.map`; each process builds the `Encoder` once (see `_task_encoder`)."""

    path: str
    sha256: str  # of the file's bytes: part of the cache key, so a rewritten file is reloaded
    kind: str
    eod_token: str | None
    threads: int | None
    parse_special: bool = False

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated as uint32, one length per text): cheap to send between
        processes; `unpack` splits it again."""
        ids = self.encoder().encode(texts)
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return flat.astype(np.uint32), lengths

    def encoder(self) -> Encoder:
        """This process's `Encoder` of the task's tokenizer, built once."""
        return _task_encoder(self)


@functools.lru_cache(maxsize=4)
def _task_encoder(task: EncodeTask) -> Encoder:
    tokenizer = TokenizerFile(task.kind, Path(task.path).read_bytes(), task.eod_token)
    return Encoder(
        tokenizer, threads=task.threads, source=task.path, parse_special=task.parse_special
    )


def unpack(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """`EncodeTask`'s packed result → one id array per text."""
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
