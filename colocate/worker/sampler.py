"""Sampler: turns one logits row per request into the request's next token.

Order of operations for a row, as vLLM users expect:
  raw logits -> (logprobs are read here, before anything changes them)
             -> repetition / frequency / presence penalties
             -> min_tokens: stop ids masked while the output is still too short
             -> greedy rows: argmax, done
             -> temperature -> top-k -> top-p -> min-p -> draw

The draw is an inverse-CDF lookup with one uniform per row. A seeded request
takes its uniform from its own torch.Generator, and every filter is a row-wise
function of that row alone, so its tokens never depend on which other requests
share its batch. Everything else (penalties, filters, cumsums) runs batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from colocate.sampling_params import SamplingParams

# Logprob reported for requests that did not ask for logprobs: computing it costs a
# full pass over the vocabulary, which the greedy fast path exists to avoid.
NOT_COMPUTED = math.nan

# top_p value that removes nothing, even when the float cumulative sum ends a hair
# above 1.0 (a disabled row must come out of the filter bit for bit unchanged).
_TOP_P_OFF = 2.0


@dataclass
class SamplingRow:
    """One logits row to sample from, with everything the filters need."""
    params: SamplingParams
    generator: torch.Generator | None  # per request; None when params.seed is None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]    # generated so far (for penalties and min_tokens)
    stop_token_ids: Sequence[int]      # EOS ids (unless params.ignore_eos) + params.stop_token_ids


@dataclass
class SampleResult:
    token_id: int
    # Of the sampled token under the model's raw log-softmax. Computed only for
    # requests with params.logprobs set; NOT_COMPUTED (NaN) otherwise.
    logprob: float
    # When params.logprobs=k: the k most likely ids plus the sampled one.
    top_logprobs: dict[int, float] | None


def make_generator(seed: int | None, device: str | torch.device = "cpu"
                   ) -> torch.Generator | None:
    """The per-request generator for a seeded request; None means the global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor) -> list[float]:
    """log p(next_token_ids[i] | prefix) for each row i of logits (n, V)."""
    logits = logits.float()
    picked = logits.gather(1, next_token_ids.long().unsqueeze(1)).squeeze(1)  # (n,)
    # gather - logsumexp instead of log_softmax: a prompt chunk can be thousands of
    # rows, and this never materialises a second (n, V) tensor.
    return (picked - torch.logsumexp(logits, dim=-1)).tolist()


def _is_plain_greedy(row: SamplingRow) -> bool:
    """True when argmax of the raw row is the whole answer."""
    p = row.params
    return (p.greedy and p.logprobs is None
            and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
            and (len(row.output_token_ids) >= p.min_tokens or len(row.stop_token_ids) == 0))


def _has_penalties(p: SamplingParams) -> bool:
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0)


class Sampler:
    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """One token per row of logits (N, V); rows[i] describes row i."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be (len(rows)={len(rows)}, V), "
                             f"got {tuple(logits.shape)}")
        # Batch-1 greedy decode is the hot path: one argmax, one list, no filters.
        if all(map(_is_plain_greedy, rows)):
            return [SampleResult(t, NOT_COMPUTED, None)
                    for t in logits.argmax(dim=-1).tolist()]
        return self._sample_general(logits.float(), rows)

    def _sample_general(self, logits: torch.Tensor, rows: list[SamplingRow]
                        ) -> list[SampleResult]:
        device = logits.device
        work = logits.clone()                                     # (N, V)
        _apply_penalties(work, rows)
        _mask_stop_ids_until_min_tokens(work, rows)
        work = _tame(work)

        tokens = torch.empty(len(rows), dtype=torch.long, device=device)  # (N,)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            g_idx = torch.tensor(greedy, device=device)
            tokens[g_idx] = work[g_idx].argmax(dim=-1)
        if drawn:
            d_idx = torch.tensor(drawn, device=device)
            tokens[d_idx] = _draw(work[d_idx], [rows[i] for i in drawn])

        token_list = tokens.tolist()
        results = [SampleResult(t, NOT_COMPUTED, None) for t in token_list]
        _fill_logprobs(results, logits, tokens, rows)
        return results


# --- penalties and masks (in place on the working logits) -----------------------

def _token_counts(seqs: list[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """How often each vocabulary id occurs in each sequence, as (len(seqs), V)."""
    width = max((len(s) for s in seqs), default=0)
    # Pad with id `vocab`: it lands in an extra column that is cut off afterwards,
    # so ragged sequences scatter in one call.
    ids = torch.full((len(seqs), max(width, 1)), vocab, dtype=torch.long)  # (P, W)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    ids = ids.to(device)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)    # (P, V + 1)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]                                     # (P, V)


def _apply_penalties(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    picked = [i for i, r in enumerate(rows) if _has_penalties(r.params)]
    if not picked:
        return
    device, vocab = work.device, work.shape[1]
    sel = [rows[i] for i in picked]
    idx = torch.tensor(picked, device=device)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=work.dtype, device=device).unsqueeze(1)  # (P, 1)

    l = work[idx]                                                # (P, V)
    out_counts = _token_counts([r.output_token_ids for r in sel], vocab, device)  # (P, V)
    in_output = out_counts > 0                                   # (P, V)

    rep = [r.params.repetition_penalty for r in sel]
    if any(v != 1.0 for v in rep):
        # Repetition penalty looks at the prompt too; dividing a positive logit and
        # multiplying a negative one both make the token less likely.
        seen = in_output | (_token_counts([r.prompt_token_ids for r in sel],
                                          vocab, device) > 0)   # (P, V)
        rp = column(rep)                                         # (P, 1)
        l = torch.where(seen, torch.where(l > 0, l / rp, l * rp), l)

    # Frequency and presence penalties look at the output only (OpenAI convention).
    l = l - column([r.params.frequency_penalty for r in sel]) * out_counts
    l = l - column([r.params.presence_penalty for r in sel]) * in_output
    work[idx] = l


def _mask_stop_ids_until_min_tokens(work: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = work.shape[1]
    row_ids: list[int] = []
    tok_ids: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens:
            # An id beyond the vocabulary can never be sampled: nothing to mask.
            ids = [t for t in r.stop_token_ids if 0 <= t < vocab]
            row_ids.extend([i] * len(ids))
            tok_ids.extend(ids)
    if row_ids:
        work[torch.tensor(row_ids, device=work.device),
             torch.tensor(tok_ids, device=work.device)] = -math.inf


def _tame(l: torch.Tensor) -> torch.Tensor:
    """Logits that extreme but valid parameters pushed past float32, put back in
    the order they meant. A repetition penalty of 1e-300 divides a logit to +inf: it
    becomes the largest finite value. A temperature of 1e300 turns a masked -inf
    into NaN (-inf / inf): it is masked again. A row left with no possible token
    (min_tokens with a stop list covering the whole vocabulary) becomes uniform.
    Without this a NaN row would draw an id past the vocabulary."""
    l = torch.nan_to_num(l, nan=-math.inf, posinf=torch.finfo(l.dtype).max,
                         neginf=-math.inf)
    dead = torch.isneginf(l).all(dim=-1, keepdim=True)          # (N, 1)
    return l.masked_fill(dead, 0.0)


# --- random draw: temperature, top-k, top-p, min-p, then one uniform per row -------

def _draw(l: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Sample one id per row of the penalised logits l (S, V); returns (S,)."""
    device, vocab = l.device, l.shape[1]
    temps = torch.tensor([r.params.temperature for r in rows], dtype=l.dtype,
                         device=device).unsqueeze(1)             # (S, 1)
    l = _tame(l / temps)                                         # (S, V)

    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    ps = [r.params.top_p if r.params.top_p < 1.0 else _TOP_P_OFF for r in rows]
    if any(k < vocab for k in ks) or any(p != _TOP_P_OFF for p in ps):
        l = _top_k_top_p(l, ks, ps)

    # Unnormalised probabilities scaled so the most likely token has weight 1:
    # min-p then compares weights with min_p directly, and the draw below needs
    # no normalisation at all.
    weights = torch.exp(l - l.amax(dim=-1, keepdim=True))       # (S, V)
    if any(r.params.min_p > 0.0 for r in rows):
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=weights.dtype,
                             device=device).unsqueeze(1)         # (S, 1)
        weights = weights.masked_fill(weights < min_p, 0.0)      # (S, V)
    return _inverse_cdf(weights, rows)


def _top_k_top_p(l: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """Keep row i's ks[i] largest logits, then the nucleus of those reaching ps[i].

    Works on the logits sorted best-first. When every row has a top-k, only the
    K = max(ks) best need sorting (topk), far cheaper than sorting the vocabulary.
    Either way a row's decision is bit-identical: beyond its own k the sorted
    logits are -inf, whose zero weights leave a sequential cumsum unchanged.
    """
    vocab = l.shape[1]
    if max(ks) < vocab:
        best, order = l.topk(max(ks), dim=-1)                    # (S, K)
    else:
        best, order = l.sort(dim=-1, descending=True)            # (S, V)
    rank = torch.arange(best.shape[1], device=l.device)          # (K,)
    keep = rank < torch.tensor(ks, device=l.device).unsqueeze(1)  # (S, K)
    if any(p != _TOP_P_OFF for p in ps):
        best = best.masked_fill(~keep, -math.inf)                # (S, K)
        weight = torch.exp(best - best[:, :1])                   # (S, K)
        mass = weight.cumsum(dim=-1, dtype=torch.float64)        # (S, K)
        # A token stays if the mass strictly before it is still short of p; the
        # best token has none before it, so at least one token always survives.
        before = torch.nn.functional.pad(mass[:, :-1], (1, 0))   # (S, K)
        p = torch.tensor(ps, dtype=torch.float64, device=l.device).unsqueeze(1)  # (S, 1)
        keep &= before < p * mass[:, -1:]
    full_keep = torch.zeros_like(l, dtype=torch.bool).scatter_(1, order, keep)  # (S, V)
    return l.masked_fill(~full_keep, -math.inf)


def _inverse_cdf(weights: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Draw id i of row s with probability weights[s, i] / weights[s].sum().

    One uniform per row, taken from the row's own generator when it has a seed,
    so a seeded request's stream is the same alone or in any batch; unseeded rows
    share one draw from the global RNG. (Cheaper than the exponential race, which
    needs V random numbers per row.)
    """
    device = weights.device
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)            # (S, V)
    # float32 uniforms are at most 1 - 2**-24, so u * total stays strictly below
    # the total in float64 and the search never runs off the end.
    u = torch.empty(len(rows), dtype=torch.float32, device=device)  # (S,)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        u.uniform_()
    else:
        if unseeded:
            u[torch.tensor(unseeded, device=device)] = torch.rand(
                len(unseeded), device=device)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, generator=r.generator, device=device)[0]
    target = u.double().unsqueeze(1) * cdf[:, -1:]               # (S, 1)
    # right=True skips zero-weight ids: their cdf equals their predecessor's.
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # (S,)


# --- logprobs ----------------------------------------------------------------------

def _fill_logprobs(results: list[SampleResult], logits: torch.Tensor,
                   tokens: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Raw-logit logprobs for the rows that asked; one log_softmax for all of them."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return
    idx = torch.tensor(wanted, device=logits.device)
    lp = torch.log_softmax(logits[idx], dim=-1)                  # (L, V)
    sampled = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()  # (L,)
    ks = [rows[i].params.logprobs for i in wanted]
    top_vals, top_ids = lp.topk(min(max(ks), lp.shape[1]), dim=-1)  # (L, K)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        k = ks[j]
        top = dict(zip(top_ids[j][:k], top_vals[j][:k]))
        top[results[i].token_id] = sampled[j]
        results[i].logprob = sampled[j]
        results[i].top_logprobs = top
