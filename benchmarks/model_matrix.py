"""The model matrix of the README's "Model families": a tiny random-weight model of each served family
(``benchmarks.tiny_models``: the family's head_dim, GQA ratio, RoPE, norms and layer pattern, sliding windows
included) served through vLLM's CPU build with every layer in E8 pages, against ``auto`` on the same model.

Every engine prefills the same 320-token prompt in chunks of 128 tokens with prefix caching on, so the later chunks
read the earlier ones from the pages (and, with a 64-token sliding window, vLLM frees the blocks that leave it).
Reported per family and dtype: vLLM's KV capacity against ``auto``'s and the format's own ratio, the mean and the
largest |Δ log-probability| of the prompt's tokens against ``auto`` (plumbing and numerics, not quality: random
weights amplify any KV error), and whether a repeat of the prompt hits the prefix cache and decodes. A third row
serves e8-k3v2 with the default protection (``protect_layers`` auto) instead of none: on these 4-layer models that is
every layer in e8-k4v4 (the first and last 2), except where sliding-window and global layers mix (Gemma 3: none).

    python -m benchmarks.model_matrix [--families llama3,gemma3] [--name model_matrix]
"""

from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from benchmarks.tiny_models import FAMILIES, tiny_model

DTYPES = ("e8-k3v2", "e8-k4v4")
PROMPT_TOKENS = 320
NEW_TOKENS = 16
CHUNK = 128
BLOCK_SIZE = 32


def head_dim(family: str) -> int:
    config = FAMILIES[family]
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def prompt(model: str) -> list[int]:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks

    return corpus_token_chunks(AutoTokenizer.from_pretrained(model), 1, PROMPT_TOKENS, seed=3)[0]


def serve(model: str, dtype: str, protect: str | None = "none") -> dict:
    """One engine: the prompt's log-probabilities (scored in prefill chunks), then the prompt twice more greedily
    (the second run hits the prefix cache); ``protect``: ``protect_layers`` (None: the default)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from benchmarks.common import kv_capacity_tokens, shutdown_llm

    ids = prompt(model)
    scored = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)  # prompt log-probs skip the cache
    own = {} if protect is None else {"protect_layers": protect}
    llm = LLM(model=model, kv_cache_dtype=dtype, max_model_len=512, block_size=BLOCK_SIZE,
              max_num_batched_tokens=CHUNK, enable_prefix_caching=True, enforce_eager=True, seed=0,
              additional_config={"nexusquant": own})
    try:
        first, _, hit = (llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
                         for params in (scored, greedy, greedy))
        return {
            "logprobs": torch.tensor([entry[t].logprob for t, entry in zip(ids[1:], first.prompt_logprobs[1:])]),
            "new_tokens": len(hit.outputs[0].token_ids),
            "cached": hit.num_cached_tokens,
            "capacity": kv_capacity_tokens(llm),
        }
    finally:
        shutdown_llm(llm)


def compare(family: str, dtype: str, auto: dict, served: dict) -> dict:
    """One row: capacity and log-probability deviation of ``served`` against ``auto``."""
    from nexusquant_vllm.dtypes import get_format

    d = head_dim(family)
    delta = (served["logprobs"] - auto["logprobs"]).abs()
    return {
        "family": family, "dtype": dtype, "head_dim": d,
        "capacity_ratio": served["capacity"] / auto["capacity"],
        "format_ratio": 2 * d * 2 / get_format(dtype, d).slot_bytes,  # bf16 K and V over one E8 slot
        "mean_abs_dlogprob": float(delta.mean()), "max_abs_dlogprob": float(delta.max()),
        "prefix_hit_tokens": served["cached"], "decoded": served["new_tokens"],
    }


def run(families: list[str]) -> list[dict]:
    rows = []
    for family in tqdm(families, desc="families"):
        model = str(tiny_model(family))
        auto = serve(model, "auto")
        for dtype in DTYPES:
            rows.append(compare(family, dtype, auto, serve(model, dtype)))
        default = compare(family, "e8-k3v2", auto, serve(model, "e8-k3v2", protect=None))
        rows.append({**default, "dtype": "e8-k3v2, default protection", "format_ratio": None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["`python -m benchmarks.model_matrix` (tiny random-weight models; Δ logprob of the prompt's tokens)", "",
             "| family | head_dim | dtype | capacity vs auto (format) | mean / max abs Δ logprob vs auto | prefix hit |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = "-" if r["format_ratio"] is None else f"{r['format_ratio']:.2f}x"
        lines.append(f"| {r['family']} | {r['head_dim']} | {r['dtype']} | {r['capacity_ratio']:.2f}x "
                     f"({fmt}) | {r['mean_abs_dlogprob']:.3f} / {r['max_abs_dlogprob']:.2f} | "
                     f"{r['prefix_hit_tokens']} tokens, {r['decoded']} decoded |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--name", default="model_matrix")
    args = p.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")

    from nexusquant_vllm.config import default_vllm_cpu_kv_space

    default_vllm_cpu_kv_space(1)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one engine at a time, in this process
    from benchmarks.common import write_results

    rows = run(families)
    payload = {"prompt_tokens": PROMPT_TOKENS, "chunk": CHUNK, "block_size": BLOCK_SIZE, "rows": rows}
    json_path, md_path = write_results(args.name, payload, table(rows))
    print(table(rows))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
