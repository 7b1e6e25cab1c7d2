"""Prefill-time token eviction: importance scorers and the block-freeing decision. Pure torch, no vLLM import."""

from nexusquant_vllm.eviction.policy import PRESETS, EvictionPolicy, blocks_to_free, parse_rate
from nexusquant_vllm.eviction.scorers import WindowAttentionScorer, heads_for_rate

__all__ = ["PRESETS", "EvictionPolicy", "WindowAttentionScorer", "blocks_to_free", "heads_for_rate", "parse_rate"]
