"""The model matrix (``benchmarks/model_matrix.py``, which the README's "Model families" table comes from) as a test:
tiny random-weight models of the families people serve (``benchmarks.tiny_models.FAMILIES``: Llama 3 head_dim 128
GQA 4, Qwen 3 QK-norm head_dim 128 GQA 8, Phi-3 head_dim 96 MHA, Gemma 3 head_dim 256 with sliding-window layers
beside a global one, Gemma 2 with logit soft-capping, Mistral with a sliding window in every layer), served through
vLLM's CPU build with every layer in E8 pages, against ``auto`` on the same model. The windows (64 tokens) are
shorter than the prompt, so vLLM frees the blocks that leave them.

Each engine prefills in chunks of 128 tokens with prefix caching on. Checked: the engine starts (the startup
self-check passes), vLLM's KV capacity is ``auto``'s times the format's ratio, prompt log-probabilities stay within a
per-family, per-dtype bound of ``auto``'s (measured), and a request repeating the prompt hits the prefix cache and
decodes.
"""

from __future__ import annotations

import pytest

from benchmarks.common import environment
from benchmarks.model_matrix import DTYPES, NEW_TOKENS, PROMPT_TOKENS, compare, serve
from benchmarks.tiny_models import FAMILIES, tiny_model
from nexusquant_vllm.vllm_glue.plugin import register

register()

# Mean |Δ log-probability| of the prompt's tokens vs auto, measured by this test (-s prints it): llama3 0.598 / 0.278,
# phi3 0.749 / 0.443, qwen3 0.286 / 0.108, gemma3 0.109 / 0.038, mistral 0.437 / 0.199, gemma2 0.084 / 0.031
# (k3v2 / k4v4); the bounds leave 1.5x. Random weights amplify any KV error (the later chunks read the earlier ones
# from pages); SmolLM2 (real weights, head_dim 64) deviates 0.07 with k4v4 under the same kind of read-back
# (tests/vllm_glue/test_parallel.py). With the sliding window ignored by the E8 path, gemma3 / mistral deviate
# 0.683 / 1.178 (k4v4); with gemma2's soft-capping ignored, 1.04 / 1.03. With garbage pages (the store skipped, every
# page zero) every family fails its bounds: llama3 0.934, qwen3 0.843, phi3 1.265, gemma3 0.505, mistral 0.765,
# gemma2 0.503 (the margin is thin for k3v2 on llama3, mistral and phi3, whose random weights amplify 3-bit keys).
BOUNDS = {
    ("llama3", "e8-k3v2"): 0.9, ("llama3", "e8-k4v4"): 0.42,
    ("qwen3", "e8-k3v2"): 0.43, ("qwen3", "e8-k4v4"): 0.16,
    ("phi3", "e8-k3v2"): 1.1, ("phi3", "e8-k4v4"): 0.66,
    ("gemma3", "e8-k3v2"): 0.16, ("gemma3", "e8-k4v4"): 0.06,
    ("mistral", "e8-k3v2"): 0.66, ("mistral", "e8-k4v4"): 0.3,
    ("gemma2", "e8-k3v2"): 0.13, ("gemma2", "e8-k4v4"): 0.05,
}


@pytest.fixture(scope="module")
def served():
    """Every (family, dtype, protect_layers) engine, built on first use, in this process with a 1 GiB KV space."""
    cache: dict = {}

    def get(family: str, dtype: str, protect: str | None = "none") -> dict:
        if (family, dtype, protect) not in cache:
            with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1"):
                cache[family, dtype, protect] = serve(str(tiny_model(family)), dtype, protect)
        return cache[family, dtype, protect]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_family_served_from_e8_pages(family, dtype, served):
    row = compare(family, dtype, served(family, "auto"), served(family, dtype))
    assert row["capacity_ratio"] == pytest.approx(row["format_ratio"], rel=0.02)
    print(f"{family} {dtype}: mean |Δ logprob| vs auto {row['mean_abs_dlogprob']:.4f}, "
          f"capacity x{row['capacity_ratio']:.2f}")
    assert row["mean_abs_dlogprob"] <= BOUNDS[family, dtype]
    assert row["prefix_hit_tokens"] >= PROMPT_TOKENS // 32 * 32 - 32 and row["decoded"] == NEW_TOKENS


def test_default_protection_is_off_where_windows_mix(served):
    """Gemma 3 mixes sliding-window and global layers, so vLLM gives all its layers one page size: the default
    ``protect_layers`` (auto) protects no layer there, and the capacity is the format's whole ratio."""
    row = compare("gemma3", "e8-k3v2", served("gemma3", "auto"), served("gemma3", "e8-k3v2", protect=None))
    assert row["capacity_ratio"] == pytest.approx(row["format_ratio"], rel=0.02)
