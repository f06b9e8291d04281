"""megalite checkpoints in lm-evaluation-harness: the model class `megalite` (`MegaliteLM`).

    python -m megalite.infer.lm_eval --model megalite --model_args checkpoint=CKPT --tasks T

The class is registered with lm-eval when this module is imported; lm-eval 0.4.x finds models
only in its registry (no entry point for plugins), so the command above is lm-eval's own CLI run
after the import, and `megalite-evaluate` (evaluate_cli.py) imports it before `simple_evaluate`.

`model_args`: `checkpoint=PATH` (anything `load_model` reads: a checkpoint of any layout, a run
folder, a Hugging Face Llama folder), `device` (cpu), `batch_size` (8), `dtype` (fp32, bf16, fp16),
`max_length` (the model's max_seq_len; at most that), `max_gen_toks` (256) and `prefix_token_id`
(the token the first one is conditioned on: default the tokenizer's end-of-sequence token).

The scoring follows lm-eval's `hf` model, so that both give the same numbers for the same weights:
the context/continuation split and empty contexts of `TemplateLM.loglikelihood`; an input of
(context + continuation) cut to the last max_length + 1 tokens minus the last; requests sorted by
length (longest first) and right-padded into one forward per batch (causal attention keeps padding
out of every real position); the log-softmax in fp32; `loglikelihood_rolling` over lm-eval's
rolling windows (`get_rolling_token_windows` with one token of context, `make_disjoint_window`):
every token predicted once, each window a full max_length where the text has that many tokens.
`generate_until` runs `megalite.infer.generate` (greedy unless the task samples), stopping at
the end-of-sequence token and at any stop string that is one token, and cuts the text at the
first stop string afterwards.

From code, `decoder=` (with `tokenizer=`) runs the scores and generations through another
`generate.Decoder` than a loaded model: the trainer's task scores (`train/watch.py`) give the
model it trains, spread over ranks as one (`infer.spread.SpreadDecoder`), every rank that holds
it serving the same requests in lockstep. `logits_fn` maps the model's logits before they are
scored or chosen from (e.g. a tensor-parallel forward's vocabulary shard (b, s, padded / tp)
gathered into the full (b, s, vocab)).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import lm_eval.models  # type: ignore[import-untyped]  # lm-eval's own models first (get_model)
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM  # type: ignore[import-untyped]
from lm_eval.api.registry import register_model  # type: ignore[import-untyped]
from lm_eval.models.utils import (  # type: ignore[import-untyped]
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from megalite.infer.generate import Decoder, decoder_device, generate
from megalite.infer.load import Loaded, Tokenizer, load_model
from megalite.model.llama import Llama

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
KNOWN_ARGS = "checkpoint, device, batch_size, dtype, max_length, max_gen_toks, prefix_token_id"
Pair = tuple[list[int], list[int]]  # (context ids, continuation ids): score the continuation
_ = lm_eval.models  # imported for its side effect: see the import


class EvalError(ValueError):
    """A request or setting the model cannot serve, said in one line."""


@register_model("megalite")
class MegaliteLM(TemplateLM):
    """A megalite model behind lm-eval's `LM` interface (see the module docstring); from code,
    `loaded=` takes a model `load_model` already gave instead of `checkpoint`, or `decoder=`
    and `tokenizer=` a decoder and its tokenizer; `logits_fn` maps its (b, s, *) logits to the
    (b, s, vocab) ones used (default: as they are)."""

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int | str = 8,
        dtype: str = "fp32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it for batch_size=auto: unused
        loaded: Loaded | None = None,
        decoder: Decoder | None = None,
        tokenizer: Tokenizer | None = None,
        logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise EvalError(f"unknown model_args {', '.join(unknown)} (known: {KNOWN_ARGS})")
        if dtype not in DTYPES:
            raise EvalError(f"dtype={dtype}: one of {', '.join(DTYPES)}")
        if decoder is None:
            if loaded is None:
                if checkpoint is None:
                    raise EvalError("model_args needs checkpoint=PATH")
                loaded = load_model(checkpoint, device=_available(device), dtype=DTYPES[dtype])
            decoder, tokenizer, self.source = loaded.model, loaded.tokenizer, str(loaded.source)
        else:
            self.source = "" if tokenizer is None else str(tokenizer.source)
        if tokenizer is None:
            raise EvalError(f"{self.source}: loaded without a tokenizer")
        self.model: Decoder = decoder
        self.tok = tokenizer
        self._device = decoder_device(decoder)
        self.batch_size = _batch_size(batch_size)
        context = decoder.cfg.max_seq_len
        if max_length is not None and not 2 <= int(max_length) <= context:
            raise EvalError(f"max_length={max_length}: from 2 to the model's {context}")
        self.max_length = int(max_length or context)
        self.max_gen_toks = int(max_gen_toks)
        self._prefix = prefix_token_id
        self._logits_fn = logits_fn

    # ---- what TemplateLM builds on ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise EvalError(
                f"{self.tok.source} names no end-of-sequence token: give model_args "
                "prefix_token_id=N (the token a text's first token is conditioned on)"
            )
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix if self._prefix is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.source).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tok.encode(string)  # megalite's tokenizers add no special tokens

    def get_model_info(self) -> dict[str, Any]:
        model = self.model
        if isinstance(model, Llama):
            params, dtype = sum(p.numel() for p in model.parameters()), model.embed.weight.dtype
        else:  # a SpreadDecoder: the full model's count, not this rank's shards
            params, dtype = getattr(model, "num_parameters"), getattr(model, "dtype")  # noqa: B009
        return {
            "checkpoint": self.source,
            "model_num_parameters": params,
            "model_dtype": str(dtype),
            "max_length": self.max_length,
        }

    # ---- scoring --------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: Sequence[Pair], *, progress: bool = False) -> list[tuple[float, bool]]:
        """Each pair's (sum of the continuation's log-probs, whether greedy decoding gives it),
        longest first in batches of batch_size, one forward each (module docstring)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        bar = tqdm(total=len(pairs), disable=not progress, desc="megalite loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [self._row(*pairs[i]) for i in batch]
            width = max(len(r) for r in rows)
            tokens = torch.zeros((len(rows), width), dtype=torch.long)  # (b, s), right-padded
            for j, row in enumerate(rows):
                tokens[j, : len(row)] = torch.tensor(row)
            logits = self.model(tokens.to(self._device))  # (b, s, vocab) or a TP shard
            if self._logits_fn is not None:
                logits = self._logits_fn(logits)  # (b, s, vocab)
            for j, i in enumerate(batch):
                cont, end = pairs[i][1], len(rows[j])
                logp = F.log_softmax(logits[j, end - len(cont) : end].float(), dim=-1)  # (c, vocab)
                target = torch.tensor(cont, device=self._device)  # (c,)
                total = logp.gather(-1, target[:, None]).sum()
                out[i] = (float(total), bool((logp.argmax(dim=-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        return out

    def _row(self, context: list[int], continuation: list[int]) -> list[int]:
        if not context or not continuation:
            raise EvalError("a loglikelihood request needs a context and a continuation token")
        if len(continuation) > self.max_length:
            raise EvalError(f"a continuation of {len(continuation)} tokens exceeds max_length "
                            f"{self.max_length}")  # fmt: skip
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self.score([(ctx, cont) for _, ctx, cont in requests], progress=True)
        for (key, _, _), answer in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def rolling_windows(self, tokens: list[int], *, context_len: int = 1) -> list[Pair]:
        """lm-eval's rolling windows of max_length over `tokens` (each token predicted once,
        after the prefix token), each window's context cut to what its continuation lacks."""
        windows = lm_utils.get_rolling_token_windows(
            token_list=tokens,
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=context_len,
        )
        return [lm_utils.make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        owners: list[int] = []
        windows: list[Pair] = []
        for k, text in enumerate(texts):
            for window in self.rolling_windows(self.tok_encode(text)):
                owners.append(k)
                windows.append(window)
        totals = [0.0] * len(texts)
        for k, (logprob, _) in zip(owners, self.score(windows, progress=not disable_tqdm),
                                   strict=True):  # fmt: skip
            totals[k] += logprob
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def text_logprob(self, text: str) -> tuple[int, float]:
        """(tokens, summed log-prob) of a whole text over windows of max_length that advance by
        half a window: each token is scored once, after at least max_length/2 tokens of context
        (the first window's after the prefix token and what precedes them)."""
        tokens = self.tok_encode(text)
        windows = self.rolling_windows(tokens, context_len=self.max_length // 2 + 1)
        return len(tokens), sum(logprob for logprob, _ in self.score(windows))

    # ---- generation -----------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation settings
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="megalite generate_until")
        for members in groups.values():
            contexts = [requests[i].args[0] for i in members]
            texts = self.generate_texts(contexts, dict(requests[members[0]].args[1]))
            for i, context, text in zip(members, contexts, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
            bar.update(len(members))
        bar.close()
        return out

    def generate_texts(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """Continuations of `contexts` under one set of lm-eval generation kwargs, each cut at
        its first stop string."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = None if self.tok.eos_id is None else self.tok.decode([self.tok.eos_id])
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_new = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_new
        if room < 1:
            raise EvalError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length "
                            f"{self.max_length}")  # fmt: skip
        sample = bool(kwargs.pop("do_sample", False))
        settings = {
            "temperature": float(kwargs.pop("temperature", 0.0)) if sample else 0.0,
            "top_k": kwargs.pop("top_k", None),
            "top_p": kwargs.pop("top_p", None),
            "seed": int(kwargs.pop("seed", 0) or 0),
        }
        if kwargs:
            log.warning("megalite generate ignores generation kwargs %s", ", ".join(kwargs))
        prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        stops = _stop_ids(self.tok, until)
        texts = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            new = generate(self.model, [prompts[i] for i in batch], max_new_tokens=max_new,
                           stop_ids=stops, logits_fn=self._logits_fn, **settings)  # fmt: skip
            for i, ids in zip(batch, new, strict=True):
                texts[i] = postprocess_generated_text(self.tok.decode(ids), until, None)
        return texts


def _stop_ids(tok: Tokenizer, until: list[str]) -> list[int]:
    """The end-of-sequence id and the ids of the stop strings that are one token: generation can
    end there, as the text is cut at its first stop string anyway."""
    stops = [] if tok.eos_id is None else [tok.eos_id]
    for s in until:
        ids = tok.encode(s)
        if len(ids) == 1 and tok.decode(ids) == s:
            stops.append(ids[0])
    return stops


def _available(device: str) -> str:
    """`device`, or cpu for a cuda device where there is none (as lm-eval's hf model: its CLI
    asks for cuda unless told otherwise)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("no CUDA device: evaluating on cpu instead of %s", device)
        return "cpu"
    return str(device)


def _batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise EvalError(f"batch_size={value}: give a number (megalite has no 'auto')") from None
    if size < 1:
        raise EvalError(f"batch_size={value}: at least 1")
    return size


def cli_main() -> None:
    """lm-eval's own command line, with the `megalite` model registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate  # type: ignore[import-untyped]

    from megalite.rank.env import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # before a ZeRO checkpoint's unpickling imports DeepSpeed
    cli_evaluate()


if __name__ == "__main__":
    cli_main()
