"""The attention backend that serves every attention layer when an e8 KV-cache dtype is chosen.

Two kinds of layer, one backend (one block table, so eviction holes can be masked everywhere):

* **E8 layers** (``kv_cache_dtype`` = ``e8-*``): pages are packed uint8, ``[num_blocks, H_kv, block_size, slot]`` with
  the codec's slot of ``fmt.slot_bytes`` bytes per token-head (declared through ``customize_spec``; no padding).
  Protected boundary layers in an e8 ``protect_format`` (the default) are E8 layers of that dtype.
* **Layers in the model dtype** (``kv_cache_dtype`` = ``auto`` through ``kv_cache_dtype_skip_layers``: protected
  layers under ``protect_format`` ``auto``): pages stay in the model dtype, ``[num_blocks, H_kv, block_size,
  2*head_dim]`` with one token-head's ``[K | V]`` per row.

The work is done by an attention path (``nexusquant_vllm.attention``: torch, native CPU or Triton), chosen once
per layer when its ``Impl`` is built (``attention.choose_path``) and once per KV-cache group by the metadata builder,
from the platform, the dtype and the plugin's configuration (``nexusquant_vllm.config``). Attention always uses
this step's own raw K/V for the tokens being computed (first prefill chunk, continuation chunk, decode token) and the
pages only for the earlier, cached positions; positions in vLLM's null block (id 0) are masked in every path.

Sliding-window layers (and Gemma 2's logit soft-capping) are served like the others, the window (the cap) applied by
every path (each layer's path holds its
window: one KV-cache group can hold windowed and global layers when vLLM's hybrid allocator is off). vLLM frees the
blocks that fall out of a window and leaves the null block in their place, which the paths mask anyway.

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
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from nexusquant_vllm.attention import (
    AttentionPath,
    LayerKind,
    LayerObserver,
    LayerStep,
    StepBatch,
    choose_path,
    model_reader,
)
from nexusquant_vllm.config import triton_interpreter
from nexusquant_vllm.dtypes import E8_DTYPES, dtype_names, get_format, is_served
from nexusquant_vllm.vllm_glue.plugin import BACKEND_NAME, backend_class_name
from nexusquant_vllm.vllm_glue.startup import SUPPORTED_MODEL_DTYPES, run_config, run_dtype

logger = init_logger("vllm.nexusquant")


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
        return True


_BACKENDS: dict[str, type[NexusQuantBackend]] = {}


def backend_for(dtype: str) -> type[NexusQuantBackend]:
    """The backend class of one dtype, created on first use and kept as a module attribute (vLLM resolves it by
    its dotted path, ``plugin.backend_path(dtype)``)."""
    if dtype not in _BACKENDS:
        name = backend_class_name(dtype)
        cls = type(name, (NexusQuantBackend,), {"e8_dtype": dtype, "__module__": __name__, "__qualname__": name})
        _BACKENDS[dtype] = cls
        globals()[name] = cls
    return _BACKENDS[dtype]


def __getattr__(name: str):
    """``E8_K3V2_Backend`` etc. for vLLM's import-by-path, in any process (PEP 562)."""
    for dtype in dtype_names():
        if backend_class_name(dtype) == name:
            return backend_for(dtype)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _dtype in E8_DTYPES:
    backend_for(_dtype)


@dataclass
class NexusQuantMetadata:
    num_actual_tokens: int
    plan: object  # what this run's attention path planned for the step (``AttentionPath.plan``)


def step_batch(cam: CommonAttentionMetadata, block_size: int) -> StepBatch:
    """vLLM's per-step tensors, trimmed to the real requests (no copy, no host sync)."""
    num_reqs = cam.num_reqs
    seq_lens_cpu = cam.seq_lens_cpu_upper_bound
    return StepBatch(
        query_start_loc=cam.query_start_loc[: num_reqs + 1],
        query_start_loc_cpu=cam.query_start_loc_cpu[: num_reqs + 1],
        seq_lens=cam.seq_lens[:num_reqs],
        seq_lens_cpu=None if seq_lens_cpu is None else seq_lens_cpu[:num_reqs],
        block_table=cam.block_table_tensor[:num_reqs],
        max_query_len=cam.max_query_len,
        max_seq_len=cam.max_seq_len,
        block_size=block_size,
    )


def layer_path(device_type: str, layer: LayerKind, vllm_config: VllmConfig | None) -> type[AttentionPath]:
    """The path of one layer in this run (``attention.choose_path`` with the run's configuration)."""
    return choose_path(device_type, layer, run_config(vllm_config).attention, triton_interpreter())


class NexusQuantMetadataBuilder(AttentionMetadataBuilder[NexusQuantMetadata]):
    """Per-step plan, built once and shared by every layer of the KV group (E8 and protected layers get the same
    kind of plan: see ``attention.choose_path``)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        model = vllm_config.model_config
        layer = LayerKind(vllm_config.cache_config.cache_dtype, True, kv_cache_spec.head_size,
                          model.get_num_attention_heads(vllm_config.parallel_config), kv_cache_spec.num_kv_heads)
        self.path = layer_path(torch.device(device).type, layer, vllm_config)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> NexusQuantMetadata:
        cam = common_attn_metadata
        return NexusQuantMetadata(cam.num_actual_tokens, self.path.plan(step_batch(cam, self.block_size)))


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
        vllm_config = get_current_vllm_config_or_none()
        coded = is_served(kv_cache_dtype)  # False: a protected layer ("auto") of an e8 run
        layer = LayerKind(kv_cache_dtype if coded else run_dtype(vllm_config), coded, head_size, num_heads,
                          num_kv_heads)
        path_cls = layer_path(current_platform.device_type, layer, vllm_config)
        self.path: AttentionPath = path_cls(layer.pages(), self.scale, sliding_window, logits_soft_cap or None)
        self.observer: LayerObserver | None = None  # set by the eviction connector's worker half
        logger.info_once("nexusquant: %s layers (%s) attend through the %s path", "E8" if coded else "protected",
                         kv_cache_dtype, path_cls.name)

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
        shape = (n, self.num_kv_heads, self.head_size)
        self.path.store(key[:n].view(shape), value[:n].view(shape), kv_cache, slot_mapping)

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
        if self.observer is not None and self.observer.active:
            reader = model_reader(self.path.pages, kv_cache)
            self.observer.observe(LayerStep(q, k, v, reader, self.scale, kv_cache))
        self.path.attend(q, k, v, kv_cache, attn_metadata.plan, output[:n].view(n, self.num_heads, self.head_size))
        return output
