"""The attention backend that serves every attention layer when an e8 KV-cache dtype is chosen.

Two kinds of layer, one backend (one block table, so eviction holes can be masked everywhere):

* **E8 layers** (``kv_cache_dtype`` = ``e8-*``): pages are packed uint8, ``[num_blocks, H_kv, block_size, slot]`` with
  the codec's slot of ``fmt.slot_bytes`` bytes per token-head (declared through ``customize_spec``; no padding).
  Keys and values are E8-coded on write (``do_kv_cache_update``) and dequantized, in the codec's rotated domain,
  only for the blocks a request reads.
* **Protected boundary layers** (``kv_cache_dtype`` = ``auto`` through ``kv_cache_dtype_skip_layers``): pages stay in
  the model dtype, ``[num_blocks, H_kv, block_size, 2*head_dim]`` with one token-head's ``[K | V]`` per row.

Attention (``paged_attention.attend``) always uses this step's own raw K/V for the tokens being computed (first
prefill chunk, continuation chunk, decode token) and the pages only for the earlier, cached positions; positions in
vLLM's null block (id 0) are masked with -inf.

vLLM's ``customize_spec`` does not see the dtype string, so there is one backend class per dtype
(``backend_for(name)``, e.g. ``E8_K3V2_Backend``); all of them answer to the enum name ``NEXUSQUANT``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from nexusquant_vllm import native
from nexusquant_vllm.vllm_glue import triton_path
from nexusquant_vllm.vllm_glue.dtypes import (
    E8_DTYPES,
    SCALAR_PREFIX,
    backend_class_name,
    codec_for,
    get_format,
    is_served,
    uses_native_cpu,
)
from nexusquant_vllm.vllm_glue.eviction import scores as eviction_scores
from nexusquant_vllm.vllm_glue.paged_attention import PageReader, RequestGroup, attend, plan_groups
from nexusquant_vllm.vllm_glue.triton_path import KernelMetadata

BACKEND_NAME = "NEXUSQUANT"
SUPPORTED_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NexusQuantBackend(AttentionBackend):
    """Base class; the per-dtype subclasses come from ``backend_for(name)``."""

    e8_dtype: ClassVar[str] = ""
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_MODEL_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", *E8_DTYPES]  # + scalar-*

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["NexusQuantImpl"]:
        return NexusQuantImpl

    @staticmethod
    def get_builder_cls() -> type["NexusQuantMetadataBuilder"]:
        return NexusQuantMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """E8 layers (uint8 storage) get the codec's packed slot; boundary layers keep the dense default."""
        if spec.dtype != torch.uint8 or spec.state_content_bytes is not None:
            return spec
        return replace(spec, state_content_bytes=get_format(cls.e8_dtype, spec.head_size).slot_bytes)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Any physical order works for the torch path (it indexes the logical [B, H, N, C] view); LBHNC is what
        # the CPU platform uses.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0 and head_size % 8 == 0

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False


_BACKENDS: dict[str, type[NexusQuantBackend]] = {}


def backend_for(dtype: str) -> type[NexusQuantBackend]:
    """The backend class of one dtype, created on first use and kept as a module attribute (vLLM resolves it by
    its dotted path, ``dtypes.backend_path(dtype)``)."""
    if dtype not in _BACKENDS:
        name = backend_class_name(dtype)
        cls = type(name, (NexusQuantBackend,), {"e8_dtype": dtype, "__module__": __name__, "__qualname__": name})
        _BACKENDS[dtype] = cls
        globals()[name] = cls
    return _BACKENDS[dtype]


def __getattr__(name: str):
    """``E8_K3V2_Backend`` etc. for vLLM's import-by-path, in any process (PEP 562)."""
    from nexusquant_vllm.vllm_glue.dtypes import dtype_names

    for dtype in dtype_names():
        if backend_class_name(dtype) == name:
            return backend_for(dtype)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _dtype in E8_DTYPES:
    backend_for(_dtype)


@dataclass
class NexusQuantMetadata:
    num_actual_tokens: int
    groups: list[RequestGroup]  # the torch path's plan (empty when ``kernel`` is set)
    kernel: KernelMetadata | None = None  # the Triton path's batch (CUDA)


def kernel_metadata(cam: CommonAttentionMetadata) -> KernelMetadata:
    """vLLM's own device tensors of this step, trimmed to the real requests (no copy, no host sync)."""
    num_reqs = cam.num_reqs
    return KernelMetadata(
        query_start_loc=cam.query_start_loc[: num_reqs + 1],
        seq_lens=cam.seq_lens[:num_reqs],
        block_table=cam.block_table_tensor[:num_reqs],
        max_query_len=cam.max_query_len,
        max_seq_len=cam.max_seq_len,
    )


class NexusQuantMetadataBuilder(AttentionMetadataBuilder[NexusQuantMetadata]):
    """Per-step index tensors, built once and shared by every layer of the KV group: the Triton kernels' batch on
    CUDA (``triton_path.enabled``), the torch path's request groups otherwise (and for the ``scalar-*`` baselines,
    which have no kernel)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.device = device
        scalar = str(vllm_config.cache_config.cache_dtype).startswith(SCALAR_PREFIX)
        self.use_kernels = not scalar and triton_path.enabled(torch.device(device), kv_cache_spec.head_size)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> NexusQuantMetadata:
        cam = common_attn_metadata
        if self.use_kernels:
            return NexusQuantMetadata(cam.num_actual_tokens, groups=[], kernel=kernel_metadata(cam))
        seq_lens_cpu = cam.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cam.seq_lens.cpu()
        num_reqs = cam.num_reqs
        groups = plan_groups(
            cam.query_start_loc_cpu[: num_reqs + 1],
            seq_lens_cpu[:num_reqs],
            cam.block_table_tensor[:num_reqs],
            self.block_size,
            self.device,
        )
        return NexusQuantMetadata(num_actual_tokens=cam.num_actual_tokens, groups=groups)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class NexusQuantImpl(AttentionImpl[NexusQuantMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"nexusquant e8 KV cache does not support {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.codec = codec_for(kv_cache_dtype) if is_served(kv_cache_dtype) else None  # None: protected layer
        self.fmt = get_format(kv_cache_dtype, head_size) if self.codec is not None else None
        self.decode_rotated = getattr(self.codec, "decode_kv_rotated", None)
        # On CUDA, E8 and protected layers store and attend through the Triton kernels (not the scalar baselines).
        self.triton = self.fmt is None or kv_cache_dtype in E8_DTYPES
        # On CPU, the store of E8 layers and the decode rows of every layer (E8 and protected) go native.
        self.native_cpu = (self.codec is None or uses_native_cpu(kv_cache_dtype)) and native.decode_attention_supports(
            head_size, num_heads, num_kv_heads
        )

    # ---- store ------------------------------------------------------------------------------------------------

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        n = slot_mapping.shape[0]
        if n == 0 or kv_cache.numel() == 0:
            return
        key = key[:n].view(n, self.num_kv_heads, self.head_size)
        value = value[:n].view(n, self.num_kv_heads, self.head_size)
        if self.triton and triton_path.enabled(kv_cache.device, self.head_size):  # padding skipped on the device
            triton_path.store(key, value, kv_cache, slot_mapping, self.fmt)
            return
        if self.fmt is not None and self.native_cpu and kv_cache.is_cpu:  # codes and writes the slots in place
            native.store_kv(key, value, kv_cache, slot_mapping, self.fmt)
            return
        valid = slot_mapping >= 0  # padding tokens carry slot -1
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        block_size = kv_cache.shape[2]
        blk = torch.div(slot_mapping, block_size, rounding_mode="floor")
        off = slot_mapping % block_size
        if self.fmt is not None:
            # No NaN/inf check on the hot path (it is a full pass); a non-finite vector gets a NaN scale and
            # decodes to NaN, never to plausible garbage.
            kv_cache[blk, :, off] = self.codec.encode_kv(key, value, self.fmt, validate=False)
        else:
            kv_cache[blk, :, off] = torch.cat([key, value], dim=-1).to(kv_cache.dtype)

    # ---- attention --------------------------------------------------------------------------------------------

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: NexusQuantMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the nexusquant backend")
        if output is None:
            output = query.new_empty(query.shape[0], self.num_heads * self.head_size)
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        read_pages = self._page_reader(kv_cache)

        if attn_metadata.kernel is not None and self.triton:
            if eviction_scores.collecting():  # a prompt ends this step and asked for eviction
                qkv = (q, k, v) if self.fmt is None else tuple(self.codec.rotate(t.float()) for t in (q, k, v))
                self._observe_for_eviction(*qkv, kv_cache, read_pages)
            triton_path.attention(q, k, v, kv_cache, attn_metadata.kernel, self.scale, self.fmt, out)
            return output

        if self.fmt is None:
            if eviction_scores.collecting():
                self._observe_for_eviction(q, k, v, kv_cache, read_pages)
            groups = self._native_decode(q, k, v, kv_cache, attn_metadata.groups, out)
            attend(q, k, v, groups, read_pages, self.scale, out)
            return output

        groups = attn_metadata.groups
        if self._native_pages(kv_cache) and all(g.token_idx.shape[1] == 1 for g in groups):
            # A decode-only step (no prompt ends in it, so no eviction scoring): the native kernel rotates q and the
            # new K/V in and the output back, sparing three tiny torch matmuls per layer (each one wakes torch's
            # thread pool, which costs more than the attention itself on a small CPU).
            self._native_decode(q, k, v, kv_cache, groups, out, rotate=True)
            return output

        # Scores and P @ V in the codec's rotated domain (the rotation is orthogonal): rotate q and this step's
        # raw K/V once, un-rotate the output once; the cached pages are never un-rotated.
        out_rot = torch.empty(n, self.num_heads, self.head_size, dtype=torch.float32, device=q.device)
        q_rot, k_rot, v_rot = (self.codec.rotate(t.float()) for t in (q, k, v))
        if eviction_scores.collecting():
            self._observe_for_eviction(q_rot, k_rot, v_rot, kv_cache, read_pages)
        groups = self._native_decode(q_rot, k_rot, v_rot, kv_cache, groups, out_rot)
        attend(q_rot, k_rot, v_rot, groups, read_pages, self.scale, out_rot)
        out.copy_(self.codec.unrotate(out_rot))
        return output

    def _observe_for_eviction(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, read_pages: PageReader
    ) -> None:
        """Hand this step's q, k, v (in the pages' domain: E8 pages live in the codec's rotated one) to the
        eviction scorer."""
        to_model = _identity if self.fmt is None else self.codec.unrotate
        eviction_scores.observe(eviction_scores.LayerStep(q, k, v, read_pages, self.scale, kv_cache, to_model))

    def _page_reader(self, kv_cache: torch.Tensor) -> PageReader:
        """The torch path's reader of cached blocks: head-major ``[Hk, n, block_size, D]`` K and V, dense or
        E8-decoded in the codec's rotated domain."""
        d, fmt, decode = self.head_size, self.fmt, self.decode_rotated

        def read_dense(ids: torch.Tensor):
            pages = kv_cache.transpose(0, 1)[:, ids]  # head-major gather: [H, n, bs, 2D]
            return pages[..., :d], pages[..., d:]

        def read_e8(ids: torch.Tensor):
            return decode(kv_cache.transpose(0, 1)[:, ids], fmt)

        return read_dense if fmt is None else read_e8

    def _native_pages(self, kv_cache: torch.Tensor) -> bool:
        """Whether the native CPU decode kernel reads this layer's pages."""
        return self.native_cpu and kv_cache.is_cpu and (self.fmt is not None or kv_cache.dtype in native.DENSE_DTYPES)

    def _native_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        groups: list[RequestGroup],
        out: torch.Tensor,
        rotate: bool = False,
    ) -> list[RequestGroup]:
        """Decode rows (one query token per request) through the native CPU kernel, which reads the pages in place;
        returns the groups left for ``attend``. ``q``/``k``/``v`` and ``out`` are in the pages' domain (rotated for E8
        pages), or in the model's domain with ``rotate``."""
        if not self._native_pages(kv_cache):
            return groups
        for grp in (g for g in groups if g.token_idx.shape[1] == 1):
            args = (kv_cache, grp.block_ids, grp.cached_len, self.scale, self.fmt, rotate)
            if grp.token_idx.shape[0] == q.shape[0]:  # the whole batch decodes: its rows are 0..n-1, in order
                out.copy_(native.decode_attention(q, k, v, *args))
            else:
                rows = grp.token_idx[:, 0]
                out[rows] = native.decode_attention(q[rows], k[rows], v[rows], *args).to(out.dtype)
        return [g for g in groups if g.token_idx.shape[1] > 1]
