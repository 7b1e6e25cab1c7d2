"""``rope_of``: the model's RoPE tables for the compaction scores, or None when they are not one plain table."""

from __future__ import annotations

import torch

from nexusquant_vllm.vllm_glue.eviction.rope import rope_of


def rotary(name: str, cache: torch.Tensor, neox: bool = True) -> torch.nn.Module:
    """A stand-in for one of vLLM's rotary embedding classes (matched by class name, like the real ones)."""
    module = type(name, (torch.nn.Module,), {})()
    module.register_buffer("cos_sin_cache", cache, persistent=False)
    module.is_neox_style = neox
    return module


def model(*ropes: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(2, 2), r) for r in ropes))


def test_one_shared_plain_rope_gives_its_cos_and_sin_halves() -> None:
    cache = torch.arange(24, dtype=torch.float32).view(3, 8)
    shared = rotary("Llama3RotaryEmbedding", cache, neox=False)
    rope = rope_of(model(shared, shared))
    assert rope is not None and not rope.neox
    assert torch.equal(rope.cos, cache[:, :4]) and torch.equal(rope.sin, cache[:, 4:])
    same_tables = rope_of(model(rotary("RotaryEmbedding", cache), rotary("RotaryEmbedding", cache.clone())))
    assert same_tables is not None and same_tables.neox


def test_no_plain_shared_rope_gives_none() -> None:
    cache = torch.rand(3, 8)
    assert rope_of(model()) is None
    assert rope_of(model(rotary("YaRNScalingRotaryEmbedding", cache))) is None  # cache scaled by an attention factor
    assert rope_of(model(rotary("RotaryEmbedding", cache), rotary("RotaryEmbedding", cache * 2))) is None  # local/global
