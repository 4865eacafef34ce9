"""Batched token sampling for one engine step, following vLLM's semantics.

Pipeline per row: raw logprobs (from the unmodified logits) -> repetition / frequency / presence
penalties -> grammar bitmask (structured output) -> min_tokens blocking of stop ids -> greedy
argmax, or temperature -> top-k -> softmax -> top-p -> min-p -> exponential-race draw
(argmax of probs / q, q ~ Exp(1)).
Everything is vectorised across rows; the only per-row Python work is the noise draw of seeded
rows, which use a private generator seeded from (seed, step) so that their tokens do not depend
on batch composition or order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from cadenza.core.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# Top-p first tries each row's few largest probabilities; a full sort is the last resort.
_CANDIDATE_WIDTHS = (256, 4096)


@dataclass
class SamplingBatch:
    """Per-row inputs of :func:`sample`; row ``i`` of every field belongs to row ``i`` of logits."""

    params: list[SamplingParams]
    output_token_ids: list[list[int]]  # generated so far: penalties, min_tokens, seed step
    prompt_token_ids: list[list[int]]  # repetition penalty covers prompt + output (vLLM / HF)
    eos_token_ids: tuple[int, ...]  # blocked with stop_token_ids while below min_tokens
    # Structured output: rows ``mask_rows`` may only sample the tokens whose bit is set in the
    # matching row of ``token_bitmask`` ([len(mask_rows), ceil(vocab / 32)] int32).
    mask_rows: list[int] | None = None
    token_bitmask: np.ndarray | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, raw logprob of the sampled token
    top_token_ids: torch.Tensor | None  # [N, K] int64, sorted by logprob; None when K == 0
    top_logprobs: torch.Tensor | None  # [N, K] float32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int) -> int:
    """64-bit generator seed of a seeded request at decode step ``step``.

    Stateless (no generator carried between steps), so preemption and recomputation replay the
    same tokens.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def _rows(mask: Sequence[bool], device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """Indices where ``mask`` holds, and an index tensor (None when that is every row)."""
    rows = [i for i, m in enumerate(mask) if m]
    return rows, None if len(rows) == len(mask) else torch.tensor(rows, device=device)


def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _col(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _flat_positions(
    token_lists: list[list[int]], rows: list[int], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct flat positions ``row * vocab + token`` of the given rows, their row and count.

    Penalties touch only tokens that occurred, so they work on these few positions instead of
    dense [N, vocab] count tensors.
    """
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.int64)
    lens = torch.tensor([len(t) for t in token_lists])
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lens)
    valid = (flat >= 0) & (flat < vocab)  # an id past the logits would spill into the next row
    pos, counts = torch.unique(row_ids[valid] * vocab + flat[valid], return_counts=True)
    return pos.to(device), (pos // vocab).to(device), counts.to(device, torch.float32)


def _apply_penalties(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF style, prompt + output), then frequency and presence (output only).

    Returns ``x`` itself when no row has a penalty, else a penalised copy.
    """
    params, vocab, dev = batch.params, x.shape[1], x.device
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    fp_rows = [
        i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    ]
    if not rep_rows and not fp_rows:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    flat_x = x.view(-1)
    if rep_rows:
        seen = [batch.prompt_token_ids[i] + batch.output_token_ids[i] for i in rep_rows]
        pos, row, _ = _flat_positions(seen, rep_rows, vocab, dev)
        pen = torch.tensor([p.repetition_penalty for p in params], device=dev)[row]
        vals = flat_x[pos]
        flat_x[pos] = torch.where(vals > 0, vals / pen, vals * pen)
    if fp_rows:
        outputs = [batch.output_token_ids[i] for i in fp_rows]
        pos, row, counts = _flat_positions(outputs, fp_rows, vocab, dev)
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[row]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[row]
        flat_x[pos] -= freq * counts + pres
    return x


def _block_stop_ids(x: torch.Tensor, batch: SamplingBatch, owned: bool) -> torch.Tensor:
    """-inf on eos (unless ignore_eos) and stop_token_ids for rows still below min_tokens."""
    rows: list[int] = []
    toks: list[int] = []
    vocab = x.shape[1]
    grammar_rows = set(batch.mask_rows or ())  # a finished grammar allows only the end
    for i, p in enumerate(batch.params):
        if len(batch.output_token_ids[i]) >= p.min_tokens or i in grammar_rows:
            continue
        ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(batch.eos_token_ids))
        for t in sorted(ids):
            if t < vocab:
                rows.append(i)
                toks.append(t)
    if not rows:
        return x
    x = x if owned else x.clone()
    x[torch.tensor(rows, device=x.device), torch.tensor(toks, device=x.device)] = -float("inf")
    return x


def _apply_bitmask(x: torch.Tensor, batch: SamplingBatch, owned: bool) -> torch.Tensor:
    """-inf on the tokens a row's grammar does not allow. Only the constrained rows are
    unpacked (one shift-and-test over their [rows, vocab] bits), so unconstrained batches pay
    nothing."""
    if batch.token_bitmask is None or not batch.mask_rows:
        return x
    vocab = x.shape[1]
    words = np.ascontiguousarray(batch.token_bitmask, dtype="<i4")
    # Bit t % 32 of little-endian word t // 32 is bit t of the byte string, LSB first.
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    banned = torch.from_numpy(bits == 0).to(x.device)
    x = x if owned else x.clone()
    rows = torch.tensor(batch.mask_rows, device=x.device)
    x[rows] = x[rows].masked_fill_(banned, -float("inf"))
    return x


def _top_k(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask logits below each row's k-th largest (ties with it survive, as in vLLM); in place."""
    vocab = x.shape[1]
    rows, idx = _rows([0 < p.top_k < vocab for p in params], x.device)
    if not rows:
        return x
    ks = torch.tensor([params[i].top_k for i in rows], device=x.device)
    sub = _take(x, idx)
    max_k = int(ks.max())
    if max_k > max(_CANDIDATE_WIDTHS, default=0):
        top = sub.sort(dim=-1, descending=True).values
    else:
        top = sub.topk(max_k, dim=-1).values
    kth = top.gather(1, (ks - 1).unsqueeze(1))
    sub.masked_fill_(sub < kth, -float("inf"))
    if idx is not None:
        x[idx] = sub
    return x


def _top_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the tokens outside each row's nucleus (in place).

    A token stays when the probability mass strictly above it is < top_p: the shortest prefix
    of the sorted distribution that reaches top_p, which always keeps the most likely token. The
    threshold comes from each row's 256 (then 4096) largest probabilities when their mass reaches
    top_p, which is the common case for peaked LLM distributions; only the remaining rows pay for
    a full sort. The threshold is the same whichever width settles it.
    """
    vocab, dev = probs.shape[1], probs.device
    rows, idx = _rows([p.top_p < 1.0 for p in params], dev)
    if not rows:
        return probs
    sub = _take(probs, idx)
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=dev)
    threshold = torch.empty_like(top_p)
    todo = torch.arange(len(rows), device=dev)
    for width in (*_CANDIDATE_WIDTHS, vocab):
        part = sub if todo.numel() == len(rows) else sub[todo]
        if width >= vocab:
            width, top = vocab, part.sort(dim=-1, descending=True).values
        else:
            top = part.topk(width, dim=-1).values
        cum = top.cumsum(dim=-1)
        p = top_p[todo]
        ok = cum[:, -1] >= p if width < vocab else torch.ones_like(p, dtype=torch.bool)
        last = (cum < p.unsqueeze(1)).sum(dim=-1).clamp(max=width - 1)
        threshold[todo[ok]] = top.gather(1, last.unsqueeze(1)).squeeze(1)[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
    sub.masked_fill_(sub < threshold.unsqueeze(1), 0.0)
    if idx is not None:
        probs[idx] = sub
    return probs


def _top_k_top_p_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities after top-k (renormalised over its survivors) and top-p (losers zeroed,
    not renormalised: the exponential race and min-p are scale-invariant)."""
    return _top_p(_top_k(x, params).softmax(dim=-1), params)


def _min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero tokens whose probability is below ``min_p * max_prob`` (in place)."""
    if all(p.min_p == 0.0 for p in params):
        return probs
    min_p = _col([p.min_p for p in params], probs.device)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill_(probs < threshold, 0.0)


def _log_uniform_noise(
    probs: torch.Tensor, params: list[SamplingParams], steps: list[int]
) -> torch.Tensor:
    """log(U), U ~ Uniform[0, 1): minus an Exp(1) draw, always < 0 (and never NaN).

    Seeded rows draw from their own generator; the others share the global RNG. (uniform_ then
    log_ is several times faster than exponential_ on CPU.)
    """
    u = torch.empty_like(probs)
    seeded = [i for i, p in enumerate(params) if p.seed is not None]
    if len(seeded) < len(params):
        u.uniform_()
    for i in seeded:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(row_seed(params[i].seed, steps[i]))  # type: ignore[arg-type]
        u[i].uniform_(generator=gen)
    return u.log_()


def _sample_random(x: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    x = x / _col([p.temperature for p in params], x.device)
    probs = _min_p(_top_k_top_p_probs(x, params), params)
    # Exponential race: argmax(probs / q) with q = -log(U) ~ Exp(1), computed as the argmin of
    # probs / log(U) <= 0 to skip a negation pass. Zero-probability tokens give 0, never chosen.
    return probs.div_(_log_uniform_noise(probs, params, steps)).argmin(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token for each row of ``logits`` ([N, vocab]); see the module docstring."""
    n = logits.shape[0]
    if not (len(batch.params) == len(batch.output_token_ids) == len(batch.prompt_token_ids) == n):
        raise ValueError(f"SamplingBatch has {len(batch.params)} rows, logits have {n}")
    raw = logits.float()
    x = _apply_penalties(raw, batch)
    x = _apply_bitmask(x, batch, owned=x is not raw)
    x = _block_stop_ids(x, batch, owned=x is not raw)

    greedy = [p.is_greedy for p in batch.params]
    if all(greedy):
        tokens = x.argmax(dim=-1)
    else:
        tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
        g_rows, g_idx = _rows(greedy, logits.device)
        if g_rows:
            tokens[g_idx] = x[g_idx].argmax(dim=-1)
        r_rows, r_idx = _rows([not g for g in greedy], logits.device)
        tokens[r_idx if r_idx is not None else slice(None)] = _sample_random(
            _take(x, r_idx),
            [batch.params[i] for i in r_rows],
            [len(batch.output_token_ids[i]) for i in r_rows],
        )

    # Raw logprobs: log_softmax(raw) = raw - logsumexp(raw), without materialising [N, vocab].
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)
    token_lp = (raw.gather(1, tokens.unsqueeze(1)) - lse).squeeze(1)
    k = min(max((p.logprobs or 0) for p in batch.params), raw.shape[1])
    if k == 0:
        return SamplerOutput(tokens, token_lp, None, None)
    top_vals, top_ids = raw.topk(k, dim=-1)
    return SamplerOutput(tokens, token_lp, top_ids, top_vals - lse)
