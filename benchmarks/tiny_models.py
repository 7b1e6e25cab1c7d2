"""Tiny random-weight models of the architectures people serve, built from a config with SmolLM2's tokenizer and
kept in the package cache (built once; the weights are seeded, so every build is identical).

They test plumbing and numerics against ``auto`` (head sizes, layer patterns), not quality: a random model's greedy
continuation flips at the smallest perturbation. (For tensor parallelism with a real model, see
``nexusquant_vllm.model_store.split_smollm2``.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from nexusquant_vllm.model_store import cache_root, smollm2_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB = 49152  # SmolLM2's tokenizer
INIT_RANGE = 0.1  # attention peakier than the default 0.02 gives, yet not so peaky that any KV error flips it

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=4096,
              rms_norm_eps=1e-5, tie_word_embeddings=True)

# The attention shapes of the families people serve, at a tiny width (head_dim, GQA ratio, RoPE, norms as the real
# models have them).
FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 3.x: head_dim 128, GQA 4, llama3 RoPE scaling.
    "llama3": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    # Qwen 3: QK-norm, head_dim 128, GQA 8 (one KV head).
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_attention_heads=8, num_key_value_heads=1,
        head_dim=128, rope_theta=1000000.0, sliding_window=None, use_sliding_window=False,
    ),
    # Phi-3/4: head_dim 96 (not a power of two), no GQA, fused QKV projection.
    "phi3": dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=384, num_attention_heads=4,
        num_key_value_heads=4, rope_theta=10000.0, sliding_window=None, pad_token_id=0,
    ),
    # Gemma 3: head_dim 256, one KV head, QK-norm, sliding-window layers interleaved with a global one (5:1 in the
    # real models, each with its own RoPE base); the window is shorter than the test's prompt.
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=64, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        hidden_activation="gelu_pytorch_tanh",
    ),
    # Gemma 2: logit soft-capping (50 in the real models; 2 here, where random weights' scaled scores reach it),
    # head_dim 256, GQA 2, sliding-window layers alternating with global ones.
    "gemma2": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=64, attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # Mistral 7B v0.1: a sliding window in every layer, head_dim 128, GQA 4.
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, rope_theta=10000.0, sliding_window=64,
    ),
}


def tiny_model(family: str) -> Path:
    """The folder of ``family``'s tiny model (built on first use)."""
    config = {**COMMON, **FAMILIES[family], "vocab_size": VOCAB, "initializer_range": INIT_RANGE, "torch_dtype": "bfloat16"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "tiny" / f"{family}-{digest}"
    if not (path / "config.json").exists():
        _build(config, path)
    return path


def _build(config: dict[str, Any], path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(smollm2_path()) / name, tmp / name)
    tmp.rename(path)
