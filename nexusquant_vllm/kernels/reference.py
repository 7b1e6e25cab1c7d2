"""Torch references of the kernels: the torch attention path (``nexusquant_vllm.attention``) on the CPU, called
with the kernels' arguments. What the kernels must compute is what the torch path computes, on the same pages."""

from __future__ import annotations

import torch

from nexusquant_vllm.attention.pages import CodecPages, DensePages, Pages
from nexusquant_vllm.attention.paged import plan_groups
from nexusquant_vllm.attention.torch_path import TorchPath
from nexusquant_vllm.codec.format import KVFormat


def _pages(fmt: KVFormat | None, kv_cache: torch.Tensor) -> Pages:
    if fmt is None:
        return DensePages(kv_cache.shape[-1] // 2)
    import nexusquant_vllm.codec as codec

    return CodecPages(codec, fmt)


def _attend_ref(query, key, value, kv_cache, block_table, query_start_loc, seq_lens, scale, fmt) -> torch.Tensor:
    """float32 output of the torch path over CPU copies of everything (rows past the last request: zeros)."""
    cpu = (lambda t: None if t is None else t.cpu())
    query, key, value, kv_cache, block_table = map(cpu, (query, key, value, kv_cache, block_table))
    groups = plan_groups(query_start_loc.cpu(), seq_lens.cpu(), block_table, kv_cache.shape[2])
    out = torch.zeros(query.shape, dtype=torch.float32)
    TorchPath(_pages(fmt, kv_cache), scale).attend(query, key, value, kv_cache, groups, out)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`nexusquant_vllm.kernels.decode_attention` (original domain in and out, float32).

    Same arguments: ``seq_lens`` counts the cached positions; ``k_new``/``v_new`` (optional) are the current
    token's raw K/V. Tokens in block 0 (vLLM's null block) are excluded from the softmax; a sequence with nothing
    to attend to yields zeros.
    """
    num_seqs = q.shape[0]
    query_start_loc = torch.arange(num_seqs + 1)
    total = seq_lens.cpu().long() + 1  # the query row is this step's token, whether or not its K/V are given
    return _attend_ref(q, k_new, v_new, kv_cache, block_table, query_start_loc, total, scale, fmt)


def prefill_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: KVFormat | None,
) -> torch.Tensor:
    """Reference of :func:`nexusquant_vllm.kernels.prefill_attention` (original domain in and out, float32).

    Same arguments. Request r's new tokens (rows ``query_start_loc[r]..[r+1]``) attend to its cached context, the
    first ``seq_lens[r] - q_len`` positions of its pages minus those in block 0 (vLLM's null block), and causally to
    its own raw ``key``/``value`` rows. Rows past the last request are zeros.
    """
    return _attend_ref(query, key, value, kv_cache, block_table, query_start_loc, seq_lens, scale, fmt)


def store_kv_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVFormat | None
) -> None:
    """Reference of :func:`nexusquant_vllm.kernels.store_kv`: the torch path's store (rows ``slot_mapping >= 0``)."""
    TorchPath(_pages(fmt, kv_cache), 1.0).store(key, value, kv_cache, slot_mapping)
