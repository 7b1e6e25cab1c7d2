"""What every benchmark shares: the model, the corpus as token chunks, Q/K/V as attention sees them, result files."""

import contextlib
import functools
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from benchmarks.corpus import load_corpus_text
from benchmarks.results_io import RESULTS_DIR, write_results
from nexusquant_vllm.model_store import smollm2_path

__all__ = [
    "QKV", "RESULTS_DIR", "capture_qkv", "corpus_token_chunks", "environment", "load_corpus_text", "paired_delta",
    "kv_capacity_tokens", "parse_serve_config", "passkey_prompts", "shutdown_llm", "smollm2_path", "write_results",
]

# The eviction benchmarks (eviction.py, eviction_capacity.py): vLLM block size, eviction rates, and the plugin
# configuration that keeps all 30 of SmolLM2's layers in bf16 (the "bf16" cache: first 15 + last 15 protected)
EVICTION_BLOCK_SIZE = 32
EVICTION_RATES = (0.0, 0.35, 0.6, 0.8)
ALL_LAYERS_BF16 = {"nexusquant": {"protect_layers": "15", "protect_format": "auto"}}
CAPTURE_ATTENTION = "nexusquant_capture"


class QKV(NamedTuple):
    """Per-layer attention inputs of one sequence; queries have the query heads, keys and values the KV heads."""

    queries: torch.Tensor  # [layers, heads, tokens, head_dim], after RoPE
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], after RoPE
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]


def corpus_token_chunks(
    tokenizer: PreTrainedTokenizerBase, n_chunks: int, chunk_len: int, seed: int
) -> list[list[int]]:
    """`n_chunks` non-overlapping windows of `chunk_len` token ids, drawn by `seed` from the tokenized corpus.

    Windows are aligned to multiples of `chunk_len` in the token stream of the whole corpus, so two chunks never
    share a token. No special tokens are added.
    """
    token_ids = tokenized_corpus(tokenizer)
    n_windows = len(token_ids) // chunk_len
    if n_chunks > n_windows:
        raise ValueError(f"the corpus holds {n_windows} windows of {chunk_len} tokens; {n_chunks} were asked for")
    starts = [window * chunk_len for window in random.Random(seed).sample(range(n_windows), n_chunks)]
    return [token_ids[start : start + chunk_len].tolist() for start in starts]


@functools.lru_cache(maxsize=2)
def tokenized_corpus(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole corpus as one token stream (about 1.1M tokens, seconds to tokenize, so it is cached; don't modify)."""
    return torch.tensor(tokenizer.encode(load_corpus_text(), add_special_tokens=False))


def capture_qkv(model_path: str, token_ids: Sequence[int], layers: Sequence[int] | None = None) -> QKV:
    """Run the transformers model (float32, CPU) on one sequence and return the Q, K, V its attention received.

    The model runs with an attention function that records its inputs and then does plain sdpa, so the tensors are
    exactly those attention consumed: Q and K after RoPE, K and V before grouped-query heads are repeated.
    `layers` picks and orders the returned layers; None returns all of them.
    """
    model = float32_model(model_path)
    with torch.inference_mode():
        model(torch.tensor([list(token_ids)]), use_cache=False)
    captured = [vars(layer.self_attn).pop("captured_qkv") for layer in model.model.layers]
    chosen = captured if layers is None else [captured[index] for index in layers]
    return QKV(*(torch.stack([qkv[part][0] for qkv in chosen]) for part in range(3)))


@functools.lru_cache(maxsize=1)
def float32_model(model_path: str) -> PreTrainedModel:
    """The model in float32 on the CPU, with the recording attention function, loaded once per path."""
    AttentionInterface.register(CAPTURE_ATTENTION, recording_sdpa)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=CAPTURE_ATTENTION
    )
    return model.eval()


def recording_sdpa(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, after keeping its inputs on the attention module as `captured_qkv`."""
    module.captured_qkv = (query, key, value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Temporarily set (or, with None, unset) environment variables."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core now, so that the next engine of the same script gets the memory and cores."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def paired_delta(nll: np.ndarray, ref: np.ndarray, n_tokens: int, reps: int = 2000, seed: int = 0):
    """ΔPPL = exp(ΣNLL/N - ΣNLL_ref/N) - 1, and a 95% bootstrap CI resampling chunks (paired)."""
    diff = (nll - ref) / n_tokens
    point = math.expm1(diff.mean())
    rng = np.random.default_rng(seed)
    boots = np.expm1(diff[rng.integers(0, len(diff), size=(reps, len(diff)))].mean(axis=1))
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def passkey_prompts(tokenizer, n_trials: int, prompt_tokens: int, seed: int) -> list[tuple[str, str, float]]:
    """(prompt, passkey, depth) triples; depths spread evenly over (0.1, 0.9)."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in load_corpus_text().split(".") if 40 < len(s.strip()) < 300]
    out = []
    for t in range(n_trials):
        key = str(rng.randint(10000, 99999))
        depth = 0.1 + 0.8 * t / max(n_trials - 1, 1)
        needle = f" The passkey is {key}. Remember it: {key}."
        filler, n = [], 0
        while n < prompt_tokens - 60:
            s = rng.choice(sentences)
            filler.append(s)
            n += len(tokenizer(s).input_ids)
        cut = int(len(filler) * depth)
        body = " ".join(filler[:cut]) + needle + " " + " ".join(filler[cut:])
        out.append((f"{body}\nQuestion: what is the passkey? Answer: The passkey is", key, depth))
    return out


def kv_capacity_tokens(llm) -> int:
    """vLLM's KV-cache token capacity for this engine (blocks x block size)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def parse_serve_config(item: str) -> tuple[str, dict]:
    """A served configuration ``DTYPE[@PROTECT[@FORMAT]]`` -> (kv_cache_dtype, the plugin's ``additional_config``
    entries): PROTECT is ``protect_layers`` (a count, ``none``, or layer indices joined by ``+``), FORMAT
    ``protect_format`` (``auto`` or an e8 dtype). E.g. ``e8-k3v2@2@e8-k4v4``, ``e8-k3v2@0+29``."""
    dtype, *rest = item.split("@")
    if len(rest) > 2:
        raise ValueError(f"{item!r}: expected DTYPE[@PROTECT[@FORMAT]]")
    own = {}
    if rest:
        layers = rest[0].replace("+", ",")
        own["protect_layers"] = layers if "," not in layers or layers.endswith(",") else layers + ","
    if len(rest) == 2:
        own["protect_format"] = rest[1]
    return dtype, own
