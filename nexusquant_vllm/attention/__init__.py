"""Attention over the plugin's paged KV cache: one path object per implementation, chosen once per layer.

* ``paged.py``: the one torch implementation of paged attention (request planning and ``attend``);
* ``pages.py``: what a layer's pages hold (codec slots in the rotated domain, or dense ``[K | V]`` rows);
* ``torch_path.py``, ``native_cpu.py``, ``triton_gpu.py``: the paths (store, attend, per-step plan);
* ``observer.py``: the hook through which eviction scoring sees a layer's step.

:func:`choose_path` is the only place that decides which implementation serves a layer; the backend calls it once,
when a layer's ``Impl`` is built, and its metadata builder once per KV-cache group. No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexusquant_vllm import native
from nexusquant_vllm.attention.base import AttentionPath, StepBatch
from nexusquant_vllm.attention.native_cpu import NativeCpuPath
from nexusquant_vllm.attention.observer import LayerObserver, LayerStep
from nexusquant_vllm.attention.pages import CodecPages, DensePages, Pages, model_reader
from nexusquant_vllm.attention.torch_path import TorchPath
from nexusquant_vllm.attention.triton_gpu import TritonPath
from nexusquant_vllm.attention.triton_gpu import supports as triton_supports
from nexusquant_vllm.dtypes import codec_for, get_format, is_e8

__all__ = ["AttentionPath", "CodecPages", "DensePages", "LayerKind", "LayerObserver", "LayerStep", "NativeCpuPath",
           "Pages", "StepBatch", "TorchPath", "TritonPath", "build_path", "choose_path", "model_reader"]


@dataclass(frozen=True)
class LayerKind:
    """What decides a layer's path: the run's dtype, whether this layer's pages are coded, and its head shape."""

    run_dtype: str  # the run's e8-* (or scalar-*) KV-cache dtype
    coded: bool  # the layer's pages hold codec slots; False: a protected layer in the model dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int

    def pages(self) -> Pages:
        if not self.coded:
            return DensePages(self.head_dim)
        return CodecPages(codec_for(self.run_dtype), get_format(self.run_dtype, self.head_dim))


def choose_path(device_type: str, layer: LayerKind, attention: str = "auto", triton_interpreter: bool = False
                ) -> type[AttentionPath]:
    """The implementation for ``layer`` on ``device_type`` (``cuda``, ``cpu``, ...) under the configured
    ``attention`` (``auto``, ``torch``, ``native``, ``triton``; see ``nexusquant_vllm.config``).

    ``auto``: Triton on CUDA for the e8 dtypes and head_dims the kernels take; on the CPU the native kernels where
    they are built and take the shape; torch otherwise. An explicit choice that cannot serve the layer is an error,
    never a silent fallback. Every layer of one run gets the same kind of plan (Triton's, or the request groups
    shared by the torch and native paths), which is what lets one metadata builder serve them all.
    """
    if attention == "triton" or (attention == "auto" and device_type == "cuda"):
        on_device = device_type == "cuda" or (device_type == "cpu" and triton_interpreter)
        if on_device and is_e8(layer.run_dtype) and triton_supports(layer.head_dim):
            return TritonPath
        if attention == "triton":
            raise ValueError(
                f"nexusquant attention='triton' cannot serve kv_cache_dtype={layer.run_dtype!r}, head_dim "
                f"{layer.head_dim} on {device_type}: it needs an e8 dtype, a power-of-two head_dim in 16..256 and "
                "CUDA (or TRITON_INTERPRET=1 on the CPU, for tests)"
            )
    if attention in ("auto", "native") and device_type == "cpu":
        if _native_serves(layer):
            return NativeCpuPath
        if attention == "native":
            raise ValueError(
                f"nexusquant attention='native' cannot serve kv_cache_dtype={layer.run_dtype!r} with {layer.num_heads} "
                f"query heads over {layer.num_kv_heads} KV heads of head_dim {layer.head_dim}: the native CPU kernels "
                "serve e8 dtypes, head_dim <= 512 and up to 16 query heads per KV head, and must be built "
                "(pip install -e .)"
            )
    if attention == "native" and device_type != "cpu":
        raise ValueError(f"nexusquant attention='native' runs on the CPU only, not on {device_type}")
    return TorchPath


def build_path(device_type: str, layer: LayerKind, scale: float, attention: str = "auto",
               triton_interpreter: bool = False) -> AttentionPath:
    path_cls = choose_path(device_type, layer, attention, triton_interpreter)
    return path_cls(layer.pages(), scale)


def _native_serves(layer: LayerKind) -> bool:
    shape_ok = native.decode_attention_supports(layer.head_dim, layer.num_heads, layer.num_kv_heads)
    return shape_ok and (not layer.coded or (is_e8(layer.run_dtype) and native.available()))
