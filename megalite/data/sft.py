"""Supervised fine-tuning records → segments of text, each trained or not → token ids with a loss
mask: the per-record step of `prepare --format chat|prompt-response`.

Records are jsonl lines (.jsonl, .jsonl.gz, .jsonl.zst):
- `--format chat`: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
  at least one assistant message;
- `--format prompt-response`: `{"prompt": "...", "response": "..."}`, the response not empty.

A record becomes a *document* of the preparation pipeline: the canonical JSON of its segments
(`{"end": bool, "segments": [[text, trained], ...]}`), so exact and near dedup, the quality
filters (which see that JSON), the train/val split and the resume journal work on records as they
do on texts, and identical records are identical documents. `RecordTask` then tokenises each
segment on its own and concatenates, so the mask is exact by construction: the trained tokens are
the tokens of the trained segments. A prompt-response record is [prompt: context][response:
trained] + the EOS token (trained). A chat is rendered with the tokenizer's chat template (jinja2,
sandboxed, as transformers renders it) or, when it has none, `DEFAULT_CHAT_TEMPLATE`:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{EOS}<|user|>\\n...

and cut by character offsets found by rendering prefix by prefix: assistant message i is trained
from the end of `render(messages[:i], add_generation_prompt=True)` (the prefix plus the assistant
header) to the end of `render(messages[:i + 1])` (its content and the end token the template puts
after it); everything else — system and user messages, role headers — is context. A template
that does not render a conversation as the concatenation of its prefixes is refused. Tokenising
segment by segment gives the same ids as tokenising the whole text when no token would cross a
segment boundary, which holds for templates whose headers and ends are special tokens or
newlines (the default, Llama 3, ChatML). Chat needs a tokenizer.json: its template's markers are
special tokens, which the sentencepiece library does not parse from text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megalite.data.encode import EncodeTask
from megalite.data.errors import DataError
from megalite.data.inputs import json_lines, normalize
from megalite.data.loss_mask import MASKED_DTYPE, encode

SFT_FORMATS = ("chat", "prompt-response")
FORMATS = ("text", *SFT_FORMATS)
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
Segments = list[tuple[str, bool]]  # (text, trained), in order


class ChatTemplate:
    """A jinja2 chat template, rendered as transformers' `apply_chat_template` does (sandboxed,
    trim_blocks, lstrip_blocks; `bos_token`, `eos_token`, `raise_exception` defined)."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.error: type[Exception] = TemplateError
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise DataError(f"the chat template does not compile: {exc}") from None
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token}

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._tokens
        )


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def chat_segments(messages: list[dict[str, str]], template: ChatTemplate) -> Segments:
    """The rendered conversation cut into context and trained segments (see the module doc);
    ValueError when the template does not render it prefix by prefix."""
    full = template.render(messages, add_generation_prompt=False)
    segments: Segments = []
    at = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(template, messages[:i], full, generation=True))
        end = len(_prefix(template, messages[: i + 1], full, generation=False))
        segments += [(full[at:start], False), (full[start:end], True)]
        at = end
    segments.append((full[at:], False))
    return [(text, trained) for text, trained in segments if text]


def _prefix(
    template: ChatTemplate, messages: list[dict[str, str]], full: str, *, generation: bool
) -> str:
    text = template.render(messages, add_generation_prompt=generation)
    if not full.startswith(text):
        raise ValueError(
            f"the chat template does not render the conversation prefix by prefix (its first "
            f"{len(messages)} message(s) render as {text[-40:]!r}, not a prefix of the whole)"
        )
    return text


def document(segments: Segments, *, end: bool) -> str:
    """A record's document text: canonical JSON of its segments (`end`: append the EOS)."""
    raw = {"end": end, "segments": [[text, trained] for text, trained in segments]}
    return json.dumps(raw, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def read_records(path: Path, *, data_format: str, template: ChatTemplate | None) -> Iterator[str]:
    """The documents (`document`) of one jsonl file's records, in file order; a bad record
    raises `DataError` naming the file and line."""
    lines = json_lines(path)
    if lines is None:
        raise DataError(f"input {path}: --format {data_format} reads .jsonl[.gz|.zst] files")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if data_format == "chat":
            assert template is not None
            yield _chat_document(record, template, where)
        else:
            yield _prompt_response_document(record, where)


def _prompt_response_document(record: Any, where: str) -> str:
    prompt = _text_field(record, "prompt", where)
    response = _text_field(record, "response", where)
    if not response.strip():
        raise DataError(f"{where}: the response is empty")
    return document([(prompt, False), (response, True)], end=True)


def _chat_document(record: Any, template: ChatTemplate, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f"{where}: no 'messages' list (--format chat)")
    messages = [_message(m, where, k) for k, m in enumerate(record["messages"], 1)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant message: nothing to train")
    try:
        return document(chat_segments(messages, template), end=False)
    except (ValueError, template.error) as exc:
        raise DataError(f"{where}: {exc}") from None


def _message(raw: Any, where: str, k: int) -> dict[str, str]:
    if not isinstance(raw, dict) or "role" not in raw or "content" not in raw:
        raise DataError(f"{where}: message {k} needs a 'role' and a 'content'")
    role, content = raw["role"], raw["content"]
    if role not in ROLES:
        raise DataError(f"{where}: message {k} has role {role!r}, not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {k}'s content is {type(content).__name__}, not text")
    return {"role": role, "content": normalize(content)}


def _text_field(record: Any, name: str, where: str) -> str:
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{where}: no {name!r} field (--format prompt-response)")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
    return normalize(value)


@dataclass(frozen=True)
class RecordTask:
    """Tokenise a batch of record documents: each segment on its own, concatenated, the EOS
    appended where the document says so. Picklable, for `Workers.map`, like `EncodeTask`."""

    encode: EncodeTask

    def __call__(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all records' stored tokens (`loss_mask.encode`) concatenated, one length per
        record): `unpack` splits it again."""
        encoder = self.encode.encoder()
        parsed = [json.loads(doc) for doc in docs]
        texts = [text for raw in parsed for text, _ in raw["segments"]]
        ids = iter(encoder.encode(texts))
        records = []
        for raw in parsed:
            pieces = [(next(ids), trained) for _, trained in raw["segments"]]
            if raw["end"]:
                pieces.append((np.array([encoder.eod_id], dtype=np.int64), True))
            records.append(_stored(pieces))
        lengths = np.array([len(r) for r in records], dtype=np.int64)
        flat = np.concatenate(records) if records else np.zeros(0, dtype=MASKED_DTYPE)
        return flat, lengths


def _stored(pieces: list[tuple[np.ndarray, bool]]) -> np.ndarray:
    ids = np.concatenate([p for p, _ in pieces])  # (n,)
    trained = np.concatenate([np.full(len(p), t) for p, t in pieces])  # (n,)
    return encode(ids, trained)
