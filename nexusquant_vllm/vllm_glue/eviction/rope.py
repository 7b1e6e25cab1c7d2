"""The loaded model's RoPE tables, for the expected-attention scores of the per-head compaction."""

from __future__ import annotations

import torch

from nexusquant_vllm.eviction.expected import Rope

# vLLM rotary embeddings whose ``cos_sin_cache`` [max_positions, rotary_dim] is cat(cos, sin) of plain rotation
# angles (vllm/model_executor/layers/rotary_embedding/, 0.32). Excluded: YaRN and DeepSeek scaling (the cache is
# scaled by an attention factor), multimodal M-RoPE (positions are not a single index).
PLAIN_ROPES = frozenset({
    "RotaryEmbedding", "Llama3RotaryEmbedding", "LinearScalingRotaryEmbedding", "NTKScalingRotaryEmbedding",
    "DynamicNTKScalingRotaryEmbedding", "DynamicNTKAlphaRotaryEmbedding",
})


def rope_of(model: torch.nn.Module) -> Rope | None:
    """The RoPE shared by every attention layer of ``model``, or None when there is none, it is not a plain
    table, or the layers use different ones (e.g. local and global RoPE)."""
    found = {id(m): m for m in model.modules() if hasattr(m, "cos_sin_cache") and hasattr(m, "is_neox_style")}
    if not found or any(type(m).__name__ not in PLAIN_ROPES for m in found.values()):
        return None
    first, *others = found.values()
    cache = first.cos_sin_cache
    if any(m.cos_sin_cache.shape != cache.shape or not torch.equal(m.cos_sin_cache, cache) for m in others):
        return None
    cos, sin = cache.float().chunk(2, dim=-1)
    return Rope(cos, sin, neox=bool(first.is_neox_style))
