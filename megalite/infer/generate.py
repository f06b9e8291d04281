"""Autoregressive generation from the plain `Llama`: greedy or sampled, batched, with a KV cache.

`generate` continues each prompt (a list of ids) by up to `max_new_tokens` tokens and returns the
new tokens only. Prompts of different lengths are batched by left padding: the cache
(`megalite.model.llama.KVCache`) keeps the padded key slots out of every attention and starts each
sequence's rotary positions at its first real token, so a prompt gives the same tokens alone as in
any batch (to the last bit only up to the floating-point differences of another batch shape).

Greedy (temperature 0) takes the argmax, the first id of a tie, as Hugging Face's
`generate(do_sample=False)`. Sampling divides the logits by the temperature, keeps the `top_k`
largest, then the smallest set of most likely tokens whose probability reaches `top_p`, and draws
from what is left with one `torch.Generator` per sequence, seeded `seed + i` for the i-th prompt:
a prompt's sample depends on the seed and its place, not on the batch it runs in.

A sequence stops after it emits one of `stop_ids`, which is included as its last new token; the
others of its batch go on. `use_cache=False` recomputes every step from the whole sequence, one
sequence at a time through the training forward (no cache, no padding): the reference the tests
compare the cached path with.

`logits_fn` maps each step's logits before the choice (a tensor-parallel model's forward gives
this rank's vocabulary shard, which a caller may gather over TP into the full (b, vocab) there).
The model may be any `Decoder`: a plain `Llama`, or a model spread over ranks as one
(`infer.spread.SpreadDecoder`, the trainer's samples), which also makes the caches (`new_cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from megalite.config import ModelConfig
from megalite.model.llama import KVCache, Llama


class GenerateError(ValueError):
    """A request the model cannot serve (an empty prompt, one longer than its context)."""


class Decoder(Protocol):
    """What `generate` and `MegaliteLM` run: tokens (b, s), optionally continuing a cache, to
    logits (b, s, *); a plain `Llama`, or `infer.spread.SpreadDecoder`."""

    @property
    def cfg(self) -> ModelConfig: ...

    def __call__(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor: ...


def decoder_device(model: Decoder) -> torch.device:
    """Where the decoder takes its tokens."""
    if isinstance(model, Llama):
        return model.embed.weight.device
    device: torch.device = getattr(model, "device")  # noqa: B009  # SpreadDecoder's
    return device


def new_cache(model: Decoder, *, max_len: int, pad: torch.Tensor | None) -> KVCache:
    """A cache for `max_len` positions, made by the decoder where it makes its own."""
    make = getattr(model, "new_cache", None)
    return KVCache(max_len=max_len, pad=pad) if make is None else make(max_len=max_len, pad=pad)


OnToken = Callable[[int, int], None]  # (prompt index, new token id), as each token is chosen


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    on_token: OnToken | None = None,
    use_cache: bool = True,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Each prompt's new tokens (see the module docstring). `on_token(i, id)` is called for each
    token as it is chosen, in order per prompt; `logits_fn` maps each step's (b, *) logits of the
    last position to the (b, vocab) ones chosen from."""
    check_request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p)  # fmt: skip
    device = decoder_device(model)
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    choose = _Chooser(temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
    if use_cache:
        step = _cached_steps(model, prompts, max_new_tokens, device)
    else:
        step = _full_steps(model, prompts, device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(stop_ids)
    last = None
    for _ in range(max_new_tokens):
        logits = step(last)  # (b, vocab) fp32, of the next token of each sequence
        if logits_fn is not None:
            logits = logits_fn(logits)  # (b, vocab)
        chosen = choose(logits)  # (b,)
        for i, token in enumerate(chosen.tolist()):
            if done[i]:
                continue
            out[i].append(token)
            if on_token is not None:
                on_token(i, token)
            done[i] = token in stops
        if all(done):
            break
        last = chosen
    return out


def check_request(
    model: Decoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> None:
    """Raise GenerateError, in one line, for a request `generate` refuses."""
    context = model.cfg.max_seq_len
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if max_new_tokens >= context:
        raise GenerateError(f"max_new_tokens {max_new_tokens} leaves no room in a {context}-token "
                            "context for a prompt")  # fmt: skip
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise GenerateError(f"temperature must be >= 0 and top_k >= 1 (got {temperature}, {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerateError(f"top_p must be in (0, 1] (got {top_p})")
    if not prompts:
        raise GenerateError("no prompt given")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerateError(f"prompt {i + 1} is empty (it has no token)")
        if len(p) + max_new_tokens > context:
            raise GenerateError(
                f"prompt {i + 1} has {len(p)} tokens: with {max_new_tokens} new tokens that "
                f"exceeds the model's context of {context} (max_seq_len); at most "
                f"{context - max_new_tokens} prompt tokens fit"
            )
    vocab = model.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise GenerateError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")


Step = Callable[[torch.Tensor | None], torch.Tensor]  # last chosen (b,) or None -> (b, vocab)


def _cached_steps(
    model: Decoder, prompts: list[list[int]], max_new_tokens: int, device: torch.device
) -> Step:
    """The prompts left-padded into one batch run once, then one new token a step."""
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    tokens = torch.tensor([[0] * n + p for n, p in zip(pad, prompts, strict=True)], device=device)
    pads = torch.tensor(pad, device=device) if any(pad) else None
    cache = new_cache(model, max_len=longest + max_new_tokens, pad=pads)

    def step(last: torch.Tensor | None) -> torch.Tensor:
        chunk = tokens if last is None else last[:, None]  # (b, s)
        return model(chunk, cache=cache)[:, -1].float()  # (b, vocab)

    return step


def _full_steps(model: Decoder, prompts: list[list[int]], device: torch.device) -> Step:
    """Every step the whole of each sequence so far through the plain forward, one at a time."""
    seqs = [torch.tensor(p, device=device) for p in prompts]

    def step(last: torch.Tensor | None) -> torch.Tensor:
        if last is not None:
            for i, token in enumerate(last):
                seqs[i] = torch.cat([seqs[i], token.view(1)])
        return torch.cat([model(s[None])[:, -1].float() for s in seqs])  # (b, vocab)

    return step


class _Chooser:
    """The next token of each sequence from its logits: greedy, or sampled (module docstring)."""

    def __init__(
        self,
        *,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generators: list[torch.Generator],
    ) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = generators

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)  # (b,)
        logits = logits / self.temperature  # (b, vocab)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # (b, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            logits = _top_p(logits, self.top_p)
        probs = logits.softmax(dim=-1)  # (b, vocab)
        draws = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        return torch.cat(draws)  # (b,)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask all but the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, vocab)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # (b, vocab): the mass of the likelier tokens
    drop_sorted = before >= top_p  # the first token is never dropped (before = 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))
