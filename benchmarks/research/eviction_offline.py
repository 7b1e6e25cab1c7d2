"""A study (the laboratory, not the product): offline simulation of nexusquant's block eviction in HF transformers, to compare token-scoring and block-aggregation
variants cheaply before running them through vLLM (benchmarks/eviction.py).

Protocol (the continuation-perplexity protocol of benchmarks/eviction.py, same chunks): for each chunk, the float32
model prefills the first P tokens once, recording every layer's post-RoPE queries and keys and its values (the
tensors the vLLM hook can see). Each variant turns them into one score per logical block (32 tokens, or
--block-size); the shipped policy (``nexusquant_vllm.eviction.blocks_to_free``: first block and last 32 prefix tokens
kept, budget rounded down to whole blocks) picks the blocks to free; then the continuation tokens P..P+C-1 run over
the prefix's K/V with the freed blocks masked in every layer and head (what vLLM's null-block masking does) and the
NLL of tokens P+1..P+C is summed. Rate 0 is the same continuation with nothing masked.

The ``tok_*`` variants score tokens, not blocks, and mask the lowest-scoring single tokens (same sinks, recent
window and token count as the block policy), the same tokens in every layer and head. The ``lh_*`` variants choose
them per layer and per KV head, as many in each (what the product's compaction does,
``nexusquant_vllm.eviction.compaction``); ``lh_kvpress_ea_w*`` run the product's expected-attention scores alone,
``compaction*`` the product's compaction scores (``compaction_w8``; ``lh_mix_nopool`` in
results/eviction_offline_mix.md is ``compaction``'s earlier name), ``compaction_w8_guard`` with the product's fact
guard (``compaction.fact_guard``, what ships). ``l_*``: per layer, shared by its heads.

Reported per variant and rate: ΔPPL vs rate 0 and the paired ΔPPL vs the ``snapkv`` variant (the scorer shipped
before this study: window 32, avg-pool 5, mean over heads, sum over layers, block = max token), each with a 95%
bootstrap CI over chunks (``common.paired_delta``). Writes benchmarks/research/results/eviction_offline.{json,md};
every results/ path below is that folder, except the vLLM and kvpress runs it reads (benchmarks/results/).

    python -m benchmarks.research.eviction_offline [--chunks 8] [--prefix-lens 1024] [--rates 0.35,0.6] [--variants a,b]
        [--block-size 32]

``--vs-kvpress OURS,KVPRESS`` runs nothing: it reads results/OURS.json (a run of this file, or a one-dtype
``benchmarks.eviction quality`` run through vLLM) and the kvpress run results/KVPRESS.json
(benchmarks/eviction_kvpress.py on the same chunks: the digests must match) and writes
results/eviction_vs_kvpress.{json,md} (or --name): per rate, our ΔPPL minus each press's, paired by chunk, each
against its own rate-0 run (difference of the two ΔNLLs, bootstrap CI).

``--passkey-trials N`` replays benchmarks/eviction.py's N passkey prompts instead: recall per variant and rate
(``--facts KIND[:N]``: ``benchmarks.facts`` prompts, N facts each, asked one at a time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from benchmarks.common import RESULTS_DIR, write_results

from nexusquant_vllm.eviction import EvictionPolicy, WindowAttentionScorer, blocks_to_free, heads_for_rate
from nexusquant_vllm.eviction.expected import WINDOW as EXPECTED_WINDOW
from nexusquant_vllm.eviction.collector import FOCUS
from nexusquant_vllm.eviction.compaction import RUN, compaction_scores, fact_guard, run_max
from nexusquant_vllm.eviction.expected import Rope, expected_scores
from nexusquant_vllm.eviction.scorers import pool_positions, window_attention

NAME = "eviction_offline"
RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 32
ATTENTION = "nexusquant_eviction_sim"
BASELINE = "snapkv"
MAX_WINDOW = 256  # the most prompt queries any variant looks at (vLLM's last prefill chunk in benchmarks/eviction.py)
FUTURE = 512  # kvpress ExpectedAttention's n_future_positions
SINKS = 4  # kvpress ExpectedAttention's n_sink


@dataclass
class SimState:
    """What the attention function records (prefill) or masks (continuation)."""

    record: bool = True
    queries: list[torch.Tensor] = field(default_factory=list)  # per layer [Hq, P, D], post-RoPE
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [Hk, P, D], post-RoPE
    values: list[torch.Tensor] = field(default_factory=list)  # per layer [Hk, P, D]
    evicted: torch.Tensor | None = None  # bool [batch, L, Hk, P]: prefix positions masked for each continuation


STATE = SimState()


def sim_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa with GQA. Prefill: records Q/K/V. Continuation (a batch of masks, no cache): the new tokens attend to
    the recorded prefix K/V, minus each batch row's evicted positions, and causally to themselves."""
    layer = module.layer_idx
    batch, heads, t = query.shape[:3]
    groups = heads // key.shape[1]
    if STATE.record:
        STATE.queries.append(query[0])
        STATE.keys.append(key[0])
        STATE.values.append(value[0])
        mask = torch.ones(t, t, dtype=torch.bool).tril()
    else:
        prefix = STATE.keys[layer].shape[1]
        key = torch.cat([STATE.keys[layer][None].expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([STATE.values[layer][None].expand(batch, -1, -1, -1), value], dim=2)
        mask = torch.ones(batch, heads, t, prefix + t, dtype=torch.bool).tril(prefix)
        mask[..., :prefix] &= ~STATE.evicted[:, layer].repeat_interleave(groups, dim=1)[:, :, None, :]
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def load_model(path: str) -> PreTrainedModel:
    AttentionInterface.register(ATTENTION, sim_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION).eval()


# ---- scores -------------------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    """One prefix: per layer the window attention ``probs[l]`` [Hq, MAX_WINDOW, P] of its last queries, the raw
    post-RoPE tensors, and kvpress-style query statistics (pre-RoPE mean/covariance, averaged future RoPE)."""

    probs: list[torch.Tensor]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scale: float
    unrotated: list[torch.Tensor]  # per layer [Hq, P, D]: pre-RoPE queries
    future_rotation: torch.Tensor  # [D, D]: RoPE rotation averaged over the next FUTURE positions
    rope: Rope  # the model's RoPE over positions 0 .. P + FUTURE - 1, as the product's compaction sees it

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def kv_heads(self) -> int:
        return self.keys[0].shape[0]


def window_probs(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Softmax rows of the last ``window`` queries over the causal prefix: [Hq, window, P]."""
    tokens = k.shape[1]
    kk = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q[:, tokens - window :] @ kk.transpose(-1, -2) * scale
    pos = torch.arange(tokens - window, tokens)[:, None]
    return logits.masked_fill(torch.arange(tokens) > pos, float("-inf")).softmax(-1)


def rope_tables(model: PreTrainedModel, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [count, D] of positions start..start+count-1, from the model's own rotary embedding."""
    ref = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(ref, torch.arange(start, start + count)[None])
    return cos[0], sin[0]


def pool(x: torch.Tensor, width: int, kind: str) -> torch.Tensor:
    """Pool the last dimension of ``x`` over ``width`` neighbouring positions (same length): the product's average
    (``scorers.pool_positions``) or a max."""
    if kind == "avg" or width == 1:
        return pool_positions(x, width)
    out = torch.nn.functional.max_pool1d(x.reshape(-1, 1, x.shape[-1]), width, stride=1, padding=width // 2)
    return out.reshape(x.shape)


def per_head(pre: Prefill, window: int, layers: slice = slice(None)) -> torch.Tensor:
    """[L, Hq, P]: each head's attention distribution averaged over the last ``window`` queries."""
    return torch.stack([p[:, -window:].mean(1) for p in pre.probs[layers]])


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """[..., P] -> [..., P // BLOCK, BLOCK] (the partial last block is dropped: it is never eligible)."""
    n = x.shape[-1] // BLOCK
    return x[..., : n * BLOCK].reshape(*x.shape[:-1], n, BLOCK)


def aggregate(mass_: torch.Tensor, head: str, layer: str = "sum") -> torch.Tensor:
    """[L, H, blocks] -> [blocks]: max or mean over heads, sum or max over layers."""
    m = mass_.amax(1) if head == "max" else mass_.mean(1)
    return m.sum(0) if layer == "sum" else m.amax(0)


def snapkv(pre: Prefill, window: int = 32, width: int = 5, kind: str = "avg", block: str = "max",
           layers: slice = slice(None)) -> torch.Tensor:
    """Token score = mean over heads of the window attention, pooled, summed over layers; block = max/mean."""
    tok = snapkv_tokens(pre, window, width, kind, layers)
    b = blocks_of(tok)
    return b.amax(-1) if block == "max" else b.mean(-1)


def shipped(pre: Prefill) -> torch.Tensor:
    """The product's default scorer (``WindowAttentionScorer()``), summed over layers; block = max token."""
    scorer = WindowAttentionScorer()
    tok = sum(scorer.score(q, k, pre.scale) for q, k in zip(pre.queries, pre.keys))
    return blocks_of(tok).amax(-1)


def snapkv_tokens(pre: Prefill, window: int = 32, width: int = 5, kind: str = "avg",
                  layers: slice = slice(None)) -> torch.Tensor:
    """Token scores [P] of the ``snapkv`` variant, before block aggregation (the ``tok_snapkv`` variant)."""
    return pool(per_head(pre, window, layers).mean(1), width, kind).sum(0)


def tok_expected_kvpress(pre: Prefill) -> torch.Tensor:
    """Token scores [P] of the ``kvpress_ea_max`` variant, before block aggregation."""
    return kvpress_probs(pre, vnorm=True).amax(1).sum(0)


def snapkv_headmax(pre: Prefill, window: int = 32, width: int = 5) -> torch.Tensor:
    """Token score = max over heads of each head's pooled window attention, summed over layers; block = max."""
    return blocks_of(pool(per_head(pre, window), width, "avg").amax(1).sum(0)).amax(-1)


def normalised_sum(a: Callable[[Prefill], torch.Tensor], b: Callable[[Prefill], torch.Tensor]
                   ) -> Callable[[Prefill], torch.Tensor]:
    """Sum of two block scorers, each divided by its total over the blocks."""
    def score(pre: Prefill) -> torch.Tensor:
        x, y = a(pre), b(pre)
        return x / x.sum() + y / y.sum()
    return score


def mass(pre: Prefill, window: int = 32, head: str = "max", layer: str = "sum",
         layers: slice = slice(None)) -> torch.Tensor:
    """Block score = the window attention mass each head would lose with the block, over heads and layers."""
    return aggregate(blocks_of(per_head(pre, window, layers)).sum(-1), head, layer)


def expected(pre: Prefill, window: int = 128, head: str = "max", vnorm: bool = False) -> torch.Tensor:
    """Expected attention from post-RoPE window statistics (computable in the vLLM hook): each head's future
    queries ~ Gaussian (mean, covariance) of its last ``window`` post-RoPE queries; expected logit of key k is
    mu.k*s + 0.5*s^2 k'Ck; softmax over the prefix (optionally x |v|, renormalised); block = mass."""
    out = []
    for q, k, v in zip(pre.queries, pre.keys, pre.values):
        out.append(expected_probs(q[:, -window:], k, v, pre.scale, vnorm, None))
    return aggregate(blocks_of(torch.stack(out)).sum(-1), head)


def expected_kvpress(pre: Prefill, head: str = "max", vnorm: bool = True) -> torch.Tensor:
    """kvpress ExpectedAttention's statistics (pre-RoPE queries of the whole prefix minus 4 sinks, rotated by the
    RoPE averaged over the next 512 positions), with our block mass aggregation (needs the model's RoPE: sim only)."""
    return aggregate(blocks_of(kvpress_probs(pre, vnorm)).sum(-1), head)


def kvpress_probs(pre: Prefill, vnorm: bool) -> torch.Tensor:
    """[L, Hq, P]: each head's expected attention from kvpress ExpectedAttention's statistics."""
    return torch.stack([expected_probs(q[:, SINKS:], k, v, pre.scale, vnorm, pre.future_rotation)
                        for q, k, v in zip(pre.unrotated, pre.keys, pre.values)])


def expected_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, vnorm: bool,
                   rotation: torch.Tensor | None) -> torch.Tensor:
    """[Hq, P] expected attention distribution of a head's future queries, modelled from the sample ``q``."""
    groups = q.shape[0] // k.shape[0]
    mu = q.mean(1)  # [Hq, D]
    centered = q - mu[:, None]
    cov = centered.transpose(1, 2) @ centered / q.shape[1]  # [Hq, D, D]
    if rotation is not None:
        mu, cov = mu @ rotation.T, rotation @ cov @ rotation.T
    kk = k.repeat_interleave(groups, dim=0)  # [Hq, P, D]
    logits = (kk @ mu[:, :, None])[..., 0] * scale + 0.5 * scale**2 * ((kk @ cov) * kk).sum(-1)
    p = logits.softmax(-1)
    if vnorm:
        p = p * v.repeat_interleave(groups, dim=0).norm(dim=-1)
        p = p / p.sum(-1, keepdim=True)
    return p


def keep_recent(scorer: Callable[[Prefill], torch.Tensor], tokens: int) -> Callable[[Prefill], torch.Tensor]:
    """``scorer`` with the blocks touching the last ``tokens`` prefix tokens kept (scored +inf)."""
    def score(pre: Prefill) -> torch.Tensor:
        s = scorer(pre).clone()
        s[(pre.tokens - tokens) // BLOCK :] = float("inf")
        return s
    return score


def recency(pre: Prefill) -> torch.Tensor:
    """StreamingLLM-like reference: the oldest blocks (after the sink) go first."""
    return torch.arange(pre.tokens // BLOCK, dtype=torch.float32)


def rank_mix(a: Callable[[Prefill], torch.Tensor], b: Callable[[Prefill], torch.Tensor]
             ) -> Callable[[Prefill], torch.Tensor]:
    """Sum of the ranks given by two block scorers."""
    def score(pre: Prefill) -> torch.Tensor:
        return a(pre).argsort().argsort().float() + b(pre).argsort().argsort().float()
    return score


LATE = slice(2, None)
VARIANTS: dict[str, Callable[[Prefill], torch.Tensor]] = {
    "snapkv": snapkv,
    "shipped": shipped,
    "recency": recency,
    "snapkv_blockmean": lambda p: snapkv(p, block="mean"),
    "snapkv_nopool": lambda p: snapkv(p, width=1),
    "snapkv_w128": lambda p: snapkv(p, window=128),
    "snapkv_skip2": lambda p: snapkv(p, layers=LATE),
    "snapkv_recent128": keep_recent(snapkv, 128),
    "mass_mean": lambda p: mass(p, head="mean"),
    "mass_max": lambda p: mass(p, head="max"),
    "mass_max_layermax": lambda p: mass(p, head="max", layer="max"),
    "mass_max_w128": lambda p: mass(p, window=128, head="max"),
    "mass_max_w256": lambda p: mass(p, window=256, head="max"),
    "mass_mean_w128": lambda p: mass(p, window=128, head="mean"),
    "expected_max": lambda p: expected(p, head="max"),
    "expected_mean": lambda p: expected(p, head="mean"),
    "expected_max_vnorm": lambda p: expected(p, head="max", vnorm=True),
    "expected_mean_vnorm": lambda p: expected(p, head="mean", vnorm=True),
    "expected_max_w256_vnorm": lambda p: expected(p, window=256, head="max", vnorm=True),
    "expected_max_w32_vnorm": lambda p: expected(p, window=32, head="max", vnorm=True),
    "kvpress_ea_max": lambda p: expected_kvpress(p, head="max"),
    "kvpress_ea_mean": lambda p: expected_kvpress(p, head="mean"),
    "kvpress_ea_max_novnorm": lambda p: expected_kvpress(p, head="max", vnorm=False),
    "snapkv_headmax": snapkv_headmax,
    "mix_snapkv_mass_max": rank_mix(snapkv, lambda p: mass(p, head="max")),
    "sum_snapkv_mass_max": normalised_sum(snapkv, lambda p: mass(p, head="max")),
    "mix_mass_expected": rank_mix(lambda p: mass(p, head="max"), lambda p: expected(p, head="max", vnorm=True)),
}
TOKEN_VARIANTS: dict[str, Callable[[Prefill], torch.Tensor]] = {
    "tok_snapkv": snapkv_tokens,
    "tok_kvpress_ea_max": tok_expected_kvpress,
}
VARIANTS.update(TOKEN_VARIANTS)


def kv_groups(x: torch.Tensor, kv_heads: int, reduce: str = "mean") -> torch.Tensor:
    """[L, Hq, P] -> [L, Hk, P]: mean (or max) over each KV head's group of query heads."""
    grouped = x.unflatten(1, (kv_heads, -1))
    return grouped.mean(2) if reduce == "mean" else grouped.amax(2)


def lh_snapkv(pre: Prefill, window: int = 32, width: int = 5) -> torch.Tensor:
    """[L, Hk, P]: SnapKV per layer and KV head (window attention, group mean, avg-pooled)."""
    return pool(kv_groups(per_head(pre, window), pre.kv_heads), width, "avg")


def lh_expected(pre: Prefill, window: int = 128) -> torch.Tensor:
    """[L, Hk, P]: the ``expected_*_vnorm`` statistics (post-RoPE window queries) per layer and KV head."""
    probs = torch.stack([expected_probs(q[:, -window:], k, v, pre.scale, True, None)
                         for q, k, v in zip(pre.queries, pre.keys, pre.values)])
    return kv_groups(probs, pre.kv_heads)


def lh_kvpress_window(pre: Prefill, window: int) -> torch.Tensor:
    """[L, Hk, P]: the product's expected-attention scores (``nexusquant_vllm.eviction.expected.expected_scores``):
    kvpress ExpectedAttention's statistics from only the last ``window`` queries."""
    positions = torch.arange(pre.tokens - window, pre.tokens)
    return torch.stack([expected_scores(q[:, -window:], positions, k, v, pre.scale, pre.rope)
                        for q, k, v in zip(pre.queries, pre.keys, pre.values)])


def compaction(pre: Prefill, run: int = 1) -> torch.Tensor:
    """[L, Hk, P]: the product's compaction scores (``compaction.compaction_scores``): expected attention of the
    last ``expected.WINDOW`` queries plus the window attention of the last 32 in aligned runs of ``run`` tokens
    (the product's default, ``compaction.RUN``, is the ``compaction_w8`` variant), per layer and KV head."""
    expected = lh_kvpress_window(pre, EXPECTED_WINDOW)
    window = WindowAttentionScorer().window
    return torch.stack([compaction_scores(e, window_attention(q, k, pre.scale, window), run)
                        for e, q, k in zip(expected, pre.queries, pre.keys)])


LAYER_HEAD_VARIANTS: dict[str, Callable[[Prefill], torch.Tensor]] = {
    "lh_snapkv": lh_snapkv,
    "lh_snapkv_w128": lambda p: lh_snapkv(p, window=128),
    "lh_kvpress_ea": lambda p: kv_groups(kvpress_probs(p, vnorm=True), p.kv_heads),
    "lh_expected_w128": lh_expected,
    "lh_kvpress_ea_max": lambda p: kv_groups(kvpress_probs(p, vnorm=True), p.kv_heads, "max"),
    "lh_kvpress_ea_pool": lambda p: pool(kv_groups(kvpress_probs(p, vnorm=True), p.kv_heads), 3, "avg"),
    "lh_kvpress_ea_novnorm": lambda p: kv_groups(kvpress_probs(p, vnorm=False), p.kv_heads),
    "lh_kvpress_ea_w256": lambda p: lh_kvpress_window(p, 256),
    "lh_kvpress_ea_w128": lambda p: lh_kvpress_window(p, 128),
    "lh_kvpress_ea_w64": lambda p: lh_kvpress_window(p, 64),
    "compaction": compaction,
    "compaction_w8": lambda p: compaction(p, run=8),
    "compaction_w16": lambda p: compaction(p, run=16),
    "compaction_wd9": lambda p: lh_kvpress_window(p, EXPECTED_WINDOW) + pool(lh_snapkv(p, width=1), 9, "max"),
    "compaction_c4": lambda p: run_max(compaction(p), 4),
    "compaction_c8": lambda p: run_max(compaction(p), 8),
    "compaction_c16": lambda p: run_max(compaction(p), 16),
    "lh_mix": lambda p: lh_kvpress_window(p, EXPECTED_WINDOW) + lh_snapkv(p),
    "lh_mix_max": lambda p: torch.maximum(lh_kvpress_window(p, EXPECTED_WINDOW), lh_snapkv(p)),
    "l_snapkv": lambda p: pool(per_head(p, 32).mean(1), 5, "avg")[:, None].expand(-1, p.kv_heads, -1),
}
VARIANTS.update(LAYER_HEAD_VARIANTS)


def guard_scores(pre: Prefill) -> torch.Tensor:
    """[P]: the product's fact-guard scores (``collector.FOCUS``): per layer, the most any query head's last FOCUS
    queries attend a token beyond that head's 32-query window mean, summed over layers (``guard_scores.beyond``)."""
    from benchmarks.research.guard_scores import beyond

    return beyond(per_head(pre, FOCUS), per_head(pre, WindowAttentionScorer().window))


# variant -> the variant whose scores it guards with ``compaction.fact_guard`` (what the product ships as
# ``compaction_w8_guard``: every layer and KV head keeps the guarded runs, its own best tokens for the rest)
GUARDED_VARIANTS = {"compaction_w8_guard": "compaction_w8"}
VARIANTS.update({name: VARIANTS[base] for name, base in GUARDED_VARIANTS.items()})
LAYER_HEAD_VARIANTS.update({name: VARIANTS[base] for name, base in GUARDED_VARIANTS.items()})


def token_budget(tokens: int, rate: float) -> tuple[torch.Tensor, int]:
    """The prefix positions a per-token choice may evict (outside the shipped policy's sinks and recent window) and
    how many it evicts: as many as the policy's ``blocks_to_free`` frees at ``rate``."""
    policy = EvictionPolicy(rate=rate, min_prompt_tokens=0)
    eligible = torch.arange(policy.sink_blocks * BLOCK, tokens - policy.recent_tokens)
    return eligible, len(blocks_to_free(torch.zeros(tokens), BLOCK, policy)) * BLOCK


def guarded(scores: torch.Tensor, facts: torch.Tensor, rate: float) -> torch.Tensor:
    """``scores`` [L, Hk, P] with the fact guard's tokens at +inf, for the budget ``evicted_tokens_mask`` keeps at
    ``rate``."""
    eligible, evicted = token_budget(scores.shape[-1], rate)
    guard = fact_guard(facts, eligible, eligible.numel() - evicted)
    out = scores.clone()
    out[..., eligible[guard]] = float("inf")
    return out


def evicted_mask(block_scores: torch.Tensor, tokens: int, rate: float) -> torch.Tensor:
    """Prefix positions freed by the shipped policy (``blocks_to_free``, defaults) for these block scores."""
    token_scores = torch.zeros(tokens)
    full = block_scores.shape[0] * BLOCK
    token_scores[:full] = block_scores.repeat_interleave(BLOCK)  # a block's max token = its score
    mask = torch.zeros(tokens, dtype=torch.bool)
    for b in blocks_to_free(token_scores, BLOCK, EvictionPolicy(rate=rate, min_prompt_tokens=0)):
        mask[b * BLOCK : (b + 1) * BLOCK] = True
    return mask


def evicted_tokens_mask(token_scores: torch.Tensor, rate: float) -> torch.Tensor:
    """The lowest-scoring single prefix tokens, as many as ``evicted_mask`` frees, outside its sinks and window;
    along the last dimension of ``token_scores`` ([P], or [L, Hk, P] for a choice per layer and KV head)."""
    positions, budget = token_budget(token_scores.shape[-1], rate)
    eligible = torch.full_like(token_scores, float("inf"))
    eligible[..., positions] = token_scores[..., positions]
    mask = torch.zeros(token_scores.shape, dtype=torch.bool)
    mask.scatter_(-1, eligible.argsort(dim=-1, stable=True)[..., :budget], True)
    return mask


# ---- run ----------------------------------------------------------------------------------------------------------


def prefill(model: PreTrainedModel, ids: torch.Tensor, prefix_len: int) -> Prefill:
    STATE.record, STATE.queries, STATE.keys, STATE.values = True, [], [], []
    with torch.inference_mode():
        model.model(ids[:, :prefix_len], use_cache=False)
        scale = model.model.layers[0].self_attn.scaling
        window = min(MAX_WINDOW, prefix_len)
        probs = [window_probs(q, k, window, scale) for q, k in zip(STATE.queries, STATE.keys)]
        cos, sin = rope_tables(model, 0, prefix_len + FUTURE)
        half = cos.shape[-1] // 2
        rope = Rope(cos[:, :half], sin[:, :half], neox=True)  # HF's tables repeat each half
        unrotated = [rope.unrotate(q, torch.arange(prefix_len)) for q in STATE.queries]
        rotation = rope.average_rotation(prefix_len, FUTURE, cos.shape[-1])  # kvpress's ``apply_avg_rope``
    return Prefill(probs, STATE.queries, STATE.keys, STATE.values, scale, unrotated, rotation, rope)


def continuation_nll(model: PreTrainedModel, ids: torch.Tensor, prefix_len: int, cont_len: int,
                     masks: list[torch.Tensor]) -> list[float]:
    """Summed NLL of the scored tokens for each evicted-position mask, as one batch over the recorded prefix."""
    from benchmarks.eviction import scored_positions

    STATE.record, STATE.evicted = False, torch.stack(masks)
    batch = len(masks)
    inputs = ids[:, prefix_len : prefix_len + cont_len].expand(batch, -1)
    positions = torch.arange(prefix_len, prefix_len + cont_len)[None].expand(batch, -1)
    targets = ids[0, scored_positions(prefix_len, cont_len)]
    with torch.inference_mode():
        hidden = model.model(inputs, position_ids=positions, use_cache=False).last_hidden_state
        return [float(torch.nn.functional.cross_entropy(model.lm_head(h), targets, reduction="sum")) for h in hidden]


def key_of(prefix_len: int, rate: float, variant: str) -> str:
    return f"{prefix_len}|{rate}|{variant}"


def variant_masks(pre: Prefill, variants: list[str], rates: list[float]) -> tuple[list[str], list[torch.Tensor]]:
    """Result keys and evicted-position masks ``[L, Hk, P]``: rate 0, then every (variant, rate)."""
    shape = (len(pre.keys), pre.kv_heads, pre.tokens)
    keys, masks = [key_of(pre.tokens, 0.0, "-")], [torch.zeros(shape, dtype=torch.bool)]
    for name in variants:
        with torch.inference_mode():
            scores = VARIANTS[name](pre)
        per_token = name in TOKEN_VARIANTS or name in LAYER_HEAD_VARIANTS
        facts = guard_scores(pre) if name in GUARDED_VARIANTS else None
        for rate in rates:
            keys.append(key_of(pre.tokens, rate, name))
            if facts is not None:
                mask = evicted_tokens_mask(guarded(scores, facts, rate), rate)
            else:
                mask = evicted_tokens_mask(scores, rate) if per_token else evicted_mask(scores, pre.tokens, rate)
            masks.append(mask.expand(shape))
    return keys, masks


def answer_correct(model: PreTrainedModel, ids: torch.Tensor, prompt_len: int, masks: list[torch.Tensor]) -> list[bool]:
    """Per mask: whether greedy decoding over the evicted prompt reproduces the answer ``ids[prompt_len:]``
    (teacher-forced: every answer token after the first is the argmax; the first comes from the prompt's last
    position, computed before the eviction, as in vLLM)."""
    STATE.record, STATE.evicted = False, torch.stack(masks)
    answer = ids[0, prompt_len:]
    inputs = answer[None, :-1].expand(len(masks), -1)
    positions = torch.arange(prompt_len, ids.shape[1] - 1)[None].expand(len(masks), -1)
    with torch.inference_mode():
        hidden = model.model(inputs, position_ids=positions, use_cache=False).last_hidden_state
        return [bool((model.lm_head(h).argmax(-1) == answer[1:]).all()) for h in hidden]


def passkey(args: argparse.Namespace) -> dict:
    """The passkey prompts of benchmarks/eviction.py, replayed here: recall per (variant, rate)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from benchmarks.common import smollm2_path
    from benchmarks.common import passkey_prompts
    from benchmarks.facts import fact_prompts

    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path)
    hits: dict[str, list[bool]] = {}
    if args.facts:
        kind, facts = args.facts.split(":") if ":" in args.facts else (args.facts, "1")
        trials = [(f.prompt, f.answers[0], f.depths[0]) for f in
                  fact_prompts(tokenizer, args.passkey_trials, args.passkey_tokens, args.seed, kind, int(facts))]
    else:
        trials = passkey_prompts(tokenizer, args.passkey_trials, args.passkey_tokens, args.seed)
    for prompt, key, _ in tqdm(trials):
        prompt_ids = tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids + tokenizer(" " + key, add_special_tokens=False).input_ids])
        pre = prefill(model, ids, len(prompt_ids))
        keys, masks = variant_masks(pre, args.variants, args.rates)
        for key_, hit in zip(keys, answer_correct(model, ids, len(prompt_ids), masks)):
            hits.setdefault(key_.split("|", 1)[1], []).append(hit)  # prompt lengths differ: key by rate|variant
    rows = [{"rate": float(k.split("|")[0]), "variant": k.split("|")[1], "recall": sum(v) / len(v), "hits": v}
            for k, v in hits.items()]
    return {"config": vars(args), "rows": sorted(rows, key=lambda r: (r["rate"], -r["recall"]))}


def passkey_table(result: dict) -> str:
    config = result["config"]
    lines = [f"Passkey recall in the offline simulation ({config['passkey_trials']} prompts of "
             f"~{config['passkey_tokens']} tokens, depths 0.1..0.9; `python -m benchmarks.eviction_offline "
             "--passkey-trials N`)", "", "| rate | variant | recall |", "|---|---|---|"]
    lines += [f"| {r['rate']:.2f} | {r['variant']} | {r['recall']:.2f} |" for r in result["rows"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from benchmarks.common import smollm2_path
    from benchmarks.eviction import chunk_digest, continuation_chunks

    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path)
    nll: dict[str, list[float]] = {}
    evicted: dict[str, list[float]] = {}
    digests: dict[int, str] = {}
    t0 = time.time()
    for prefix_len in args.prefix_lens:
        chunks = continuation_chunks(tokenizer, prefix_len, args.cont_len, args.chunks, args.seed)
        digests[prefix_len] = chunk_digest(chunks)
        for chunk in tqdm(chunks, desc=f"prefix {prefix_len}"):
            ids = torch.tensor([chunk])
            pre = prefill(model, ids, prefix_len)
            keys, masks = variant_masks(pre, args.variants, args.rates)
            for i in range(0, len(masks), args.batch):
                nlls = continuation_nll(model, ids, prefix_len, args.cont_len, masks[i : i + args.batch])
                for key, mask, value in zip(keys[i : i + args.batch], masks[i : i + args.batch], nlls):
                    nll.setdefault(key, []).append(value)
                    evicted.setdefault(key, []).append(mask.float().mean().item())
    config = {**vars(args), "chunk_digests": digests, "wall_s": round(time.time() - t0, 1)}
    return {"config": config, "nll": nll, "evicted": evicted}


def rows_of(result: dict) -> list[dict]:
    """One row per (prefix, rate, variant): ΔPPL vs rate 0 and paired Δ vs the baseline variant, 95% CIs."""
    from benchmarks.common import paired_delta

    cont_len = result["config"]["cont_len"]
    nll = {k: np.array(v) for k, v in result["nll"].items()}
    rows = []
    for key, x in nll.items():
        prefix, rate, name = key.split("|")
        if name == "-":
            continue
        d, lo, hi = paired_delta(x, nll[key_of(int(prefix), 0.0, "-")], cont_len)
        row = {"prefix_len": int(prefix), "rate": float(rate), "variant": name,
               "fraction_evicted": float(np.mean(result["evicted"][key])), "delta_ppl": d, "ci_low": lo, "ci_high": hi}
        base = nll.get(key_of(int(prefix), float(rate), BASELINE))
        if base is not None:
            b, blo, bhi = paired_delta(x, base, cont_len)
            row.update(vs_baseline=b, vs_ci_low=blo, vs_ci_high=bhi)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["prefix_len"], r["rate"], r["delta_ppl"]))


def pct_ci(delta: float, low: float, high: float) -> str:
    """A relative change and its CI in percent: ``+1.23% [+0.45, +2.01]``."""
    return f"{100 * delta:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}]"


def table(rows: list[dict]) -> str:
    lines = [f"| prefix | rate | variant | evicted | ΔPPL vs rate 0 [95% CI] | Δ vs {BASELINE} [95% CI] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs = pct_ci(r["vs_baseline"], r["vs_ci_low"], r["vs_ci_high"]) if "vs_baseline" in r else ""
        lines.append(f"| {r['prefix_len']} | {r['rate']:.2f} | {r['variant']} | {r['fraction_evicted']:.2f} | "
                     f"{pct_ci(r['delta_ppl'], r['ci_low'], r['ci_high'])} | {vs} |")
    return "\n".join(lines)


VS_KVPRESS = "eviction_vs_kvpress"


def shipped_variant(rate: float, compacted: bool = True) -> str:
    """The variant that computes what the product evicts at this rate: per-head compaction, or whole blocks scored
    by ``heads_for_rate``'s reduction."""
    if compacted:
        return f"compaction_w{RUN}"
    return "mass_max" if heads_for_rate(rate) == "max" else "snapkv"


def vs_kvpress(offline: dict, kvpress: dict, variants: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of ``variants`` (default: the shipped compaction and block scorer at each rate; those the run has) vs
    each kvpress press at the rates both ran, paired by chunk."""
    from benchmarks.common import paired_delta

    cont_len = offline["config"]["cont_len"]
    for prefix, digest in offline["config"]["chunk_digests"].items():
        theirs = kvpress["config"]["chunk_digests"].get(prefix)
        if theirs is not None and theirs != digest:
            raise SystemExit(f"prefix {prefix}: the two runs scored different chunks ({digest} vs {theirs})")
    press_nll = {(r["press"], r["prefix_len"], r["rate"]): np.array(r["nll"]) for r in kvpress["ppl"]}
    rows = []
    for (press, prefix, rate), theirs in sorted(press_nll.items()):
        for variant in variants or (shipped_variant(rate), shipped_variant(rate, compacted=False)):
            ours = offline["nll"].get(key_of(prefix, rate, variant))
            if rate == 0 or ours is None:
                continue
            ours_delta = np.array(ours) - np.array(offline["nll"][key_of(prefix, 0.0, "-")])
            theirs_delta = theirs - press_nll[(press, prefix, 0.0)]
            d, lo, hi = paired_delta(ours_delta, theirs_delta, cont_len)
            rows.append({"prefix_len": prefix, "rate": rate, "variant": variant, "press": press,
                         "ours": float(np.expm1(ours_delta.mean() / cont_len)),
                         "theirs": float(np.expm1(theirs_delta.mean() / cont_len)),
                         "delta": d, "ci_low": lo, "ci_high": hi, "chunks": len(theirs)})
    return rows


def vs_kvpress_table(rows: list[dict]) -> str:
    lines = ["| prefix | rate | ours (variant): ΔPPL | kvpress press: ΔPPL | ours - press [95% CI] | chunks |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prefix_len']} | {r['rate']:.2f} | {r['variant']}: {100 * r['ours']:+.2f}% | "
                     f"{r['press']}: {100 * r['theirs']:+.2f}% | {pct_ci(r['delta'], r['ci_low'], r['ci_high'])} | "
                     f"{r['chunks']} |")
    return "\n".join(lines)


def vllm_as_offline(quality: dict) -> tuple[dict, str]:
    """A ``benchmarks.eviction quality`` run of one dtype in this file's result format, and its variant label."""
    dtypes = {r["dtype"] for r in quality["ppl"]}
    if len(dtypes) != 1:
        raise SystemExit(f"compare a vLLM quality run of one dtype, got {sorted(dtypes)}")
    label = f"vllm_{dtypes.pop()}"
    nll = {key_of(r["prefix_len"], r["rate"], label if r["rate"] else "-"): r["nll"] for r in quality["ppl"]}
    config = {k: quality["config"][k] for k in ("cont_len", "chunk_digests")}
    return {"config": config, "nll": nll}, label


def compare(names: str, name: str = VS_KVPRESS) -> None:
    offline_name, kvpress_name = names.split(",")
    results = [load_results(name) for name in (offline_name, kvpress_name)]
    if None in results:
        raise SystemExit(f"missing results: {[n for n, r in zip((offline_name, kvpress_name), results) if r is None]}")
    ours, variants = results[0], None
    if "ppl" in ours:  # a benchmarks/eviction.py quality run through vLLM
        ours, label = vllm_as_offline(ours)
        variants = (label,)
    rows = vs_kvpress(ours, results[1], variants)
    markdown = (f"Shipped eviction (results/{offline_name}.json: offline replay or vLLM run) "
                f"vs kvpress (token-level, per head, results/{kvpress_name}.json), same chunks; "
                f"`python -m benchmarks.research.eviction_offline --vs-kvpress {names}`\n\n" + vs_kvpress_table(rows))
    write_results(name, {"offline": offline_name, "kvpress": kvpress_name, "rows": rows}, markdown, RESULTS)
    print(markdown)


def load_results(name: str) -> dict | None:
    """``name``'s results from this study's folder, else from the product benchmarks' (vLLM and kvpress runs)."""
    for folder in (RESULTS, RESULTS_DIR):
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def main() -> None:
    global BLOCK

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=[0.35, 0.6])
    parser.add_argument("--prefix-lens", type=lambda s: [int(p) for p in s.split(",")], default=[1024])
    parser.add_argument("--cont-len", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="continuations per forward")
    parser.add_argument("--name", default=NAME, help="results/<name>.{json,md}")
    parser.add_argument("--block-size", type=int, default=BLOCK, help="tokens per block (vLLM's --block-size)")
    parser.add_argument("--vs-kvpress", metavar="OFFLINE,KVPRESS", help="compare two result files; run nothing")
    parser.add_argument("--passkey-trials", type=int, default=0,
                        help="N > 0: passkey recall of benchmarks/eviction.py's N prompts instead of perplexity")
    parser.add_argument("--passkey-tokens", type=int, default=768)
    parser.add_argument("--facts", metavar="KIND[:N]", help="with --passkey-trials: benchmarks.facts prompts of "
                        "this kind (number, code, name), N facts each, asked one at a time, instead of passkeys")
    args = parser.parse_args()
    if args.vs_kvpress:
        compare(args.vs_kvpress, VS_KVPRESS if args.name == NAME else args.name)
        return
    BLOCK = args.block_size
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    if args.passkey_trials:
        result = passkey(args)
        markdown = passkey_table(result)
        write_results(args.name, result, markdown, RESULTS)
        print(markdown)
        return
    result = run(args)
    rows = rows_of(result)
    markdown = (f"Offline block-eviction simulation (HF float32, {args.chunks} chunks per prefix length, "
                f"{args.cont_len} scored tokens each; `python -m benchmarks.research.eviction_offline`)\n\n" + table(rows))
    write_results(args.name, {**result, "rows": rows}, markdown, RESULTS)
    print(markdown)


if __name__ == "__main__":
    main()
