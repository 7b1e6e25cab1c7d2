"""What a raw window of each request's newest tokens would buy (issue 18): a replay of the E8 cache in HF transformers.

    python -m benchmarks.research.recent_window [--chunks 16] [--seed 3] [--windows 0,16,32,64,128] [--steps 256,1]

Why: on vLLM's chunked-prefill protocol (``benchmarks/quality_ppl.py``) e8's loss per token is 3.5x higher in the
first 32 positions of a prefill chunk, whose nearest neighbours come back quantized from the cache, than in the rest.
Decoding reads *every* earlier token from the cache. Before building a raw window into the paged cache (memory from
the KV budget, a second read path in every kernel), this measures what it buys.

Protocol: SmolLM2 in float32 (CPU) over 1024-token corpus chunks, every layer's attention replaced by one that
reads, for the query at position p, the key/value at position j < p quantized (the layer's E8 format: the run's
dtype, the default protected layers 0, 1, 28, 29 in e8-k4v4) unless j is in p's own step (``step`` tokens written
together: 256 = quality_ppl's prefill chunks, 1 = decoding) or among the ``window`` newest tokens before p
(p - j <= window). Each token's own K/V is exact, as in the backend. Scored: the NLL of positions 257..1023, paired
against the unquantized model (ΔPPL with a 95% bootstrap CI over chunks). The window's price: its bf16 K/V bytes
per request (the layers the run stores in E8), which vLLM would have to reserve per running sequence.
Writes benchmarks/research/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from benchmarks.attention_error import e8_roundtrip
from benchmarks.common import corpus_token_chunks, paired_delta, smollm2_path, write_results
from nexusquant_vllm.codec import get_format
from nexusquant_vllm.native.e8_quantize import quantize as native_quantize

RESULTS = Path(__file__).parent / "results"
ATTENTION = "nexusquant_recent_window"
CHUNK_LEN = 1024
FIRST_SCORED = 256  # quality_ppl scores the tokens after its first prefill chunk
PROTECTED = (0, 1, 28, 29)
PROTECT_FORMAT = "e8-k4v4"


class Replay:
    """The attention function's settings for the next forward (None: exact attention)."""

    dtype: str | None = None
    step: int = 1
    window: int = 0
    parts: str = "kv"  # which of K and V the window keeps raw


def raw_masks(tokens: int, step: int, window: int, parts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, T]`` bool each, for K and V: query p reads position j raw (j in p's own step of ``step`` tokens, or
    p - j <= ``window`` for the ``parts`` the window keeps)."""
    p = torch.arange(tokens)[:, None]
    j = torch.arange(tokens)[None, :]
    own, recent = j >= p - p % step, p - j <= window
    return own | (recent & ("k" in parts)), own | (recent & ("v" in parts))


def replay_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' attention signature: ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hk, T, D]``."""
    n_rep = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    k, v = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling
    tokens = query.shape[2]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    if Replay.dtype is None:
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), None
    fmt = get_format(PROTECT_FORMAT if module.layer_idx in PROTECTED else Replay.dtype, key.shape[-1])
    k_hat = e8_roundtrip(key, fmt.k_bits, native_quantize).repeat_interleave(n_rep, 1)
    v_hat = e8_roundtrip(value, fmt.v_bits, native_quantize).repeat_interleave(n_rep, 1)
    raw_k, raw_v = raw_masks(tokens, Replay.step, Replay.window, Replay.parts)
    scores = torch.where(raw_k, scores, torch.matmul(query, k_hat.transpose(-1, -2)) * scaling)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    out = torch.matmul(probs * raw_v, v) + torch.matmul(probs * ~raw_v, v_hat)
    return out.transpose(1, 2).contiguous(), None


def chunk_nll(model, chunk: list[int]) -> float:
    """Summed NLL of positions FIRST_SCORED + 1 .. CHUNK_LEN - 1 under the current ``Replay`` settings."""
    ids = torch.tensor([chunk])
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0, FIRST_SCORED:-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, FIRST_SCORED + 1 :], reduction="sum"))


def window_bytes(model, window: int, parts: str) -> int:
    """bf16 bytes of ``window`` tokens' ``parts`` (K, V) over the layers the run stores in its dtype."""
    cfg = model.config
    layers = cfg.num_hidden_layers - len(PROTECTED)
    return window * layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2 * len(parts)


def main() -> None:
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--dtype", default="e8-k3v2")
    p.add_argument("--windows", type=lambda s: [int(w) for w in s.split(",")], default=[0, 16, 32, 64, 128])
    p.add_argument("--steps", type=lambda s: [int(w) for w in s.split(",")], default=[256, 1])
    p.add_argument("--split-window", type=int, default=32,
                   help="also run this window with only K and only V raw, at one token per step (0: not)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="recent_window")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    AttentionInterface.register(ATTENTION, replay_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    path = str(smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION).eval()
    chunks = corpus_token_chunks(AutoTokenizer.from_pretrained(path), args.chunks, CHUNK_LEN, args.seed)
    settings = [(None, 1, 0, "kv")] + [(args.dtype, s, w, "kv") for s in args.steps for w in args.windows]
    settings += [(args.dtype, 1, args.split_window, parts) for parts in ("k", "v") if args.split_window]
    nll = {setting: [] for setting in settings}
    t0 = time.time()
    for chunk in tqdm(chunks, desc="chunks"):
        for setting in settings:
            Replay.dtype, Replay.step, Replay.window, Replay.parts = setting
            nll[setting].append(chunk_nll(model, chunk))
    scored = CHUNK_LEN - FIRST_SCORED - 1
    exact = np.array(nll[settings[0]])
    rows = []
    for setting in settings[1:]:
        dtype, step, window, parts = setting
        point, low, high = paired_delta(np.array(nll[setting]), exact, scored)
        rows.append({"dtype": dtype, "step": step, "window": window, "parts": parts, "delta_ppl": point,
                     "ci_low": low, "ci_high": high, "window_bytes_per_request": window_bytes(model, window, parts),
                     "nll": nll[setting]})
    table = ["| tokens per step | raw window (newest tokens) | ΔPPL vs exact [95% CI] | its bf16 bytes per request |",
             "|---|---|---|---|"]
    table += [f"| {r['step']} | {r['window']} {r['parts'].upper() if r['window'] else ''} | "
              f"{100 * r['delta_ppl']:+.2f}% [{100 * r['ci_low']:+.2f}, "
              f"{100 * r['ci_high']:+.2f}] | {r['window_bytes_per_request']:,} |" for r in rows]
    payload = {"model": "SmolLM2-135M-Instruct (float32, HF transformers)", "dtype": args.dtype,
               "protected": {"layers": PROTECTED, "format": PROTECT_FORMAT}, "chunks": args.chunks,
               "chunk_len": CHUNK_LEN, "seed": args.seed, "scored_tokens_per_chunk": scored,
               "exact_nll": exact.tolist(), "rows": rows, "wall_s": round(time.time() - t0, 1)}
    write_results(args.name, payload, "\n".join(table), RESULTS)
    print("\n".join(table))


if __name__ == "__main__":
    main()
