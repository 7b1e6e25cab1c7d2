"""Native CPU kernels (C++ in ``csrc/``, built by ``setup.py``, loaded through ctypes): the E8 quantizer of the store
path and paged decode attention over the packed E8 pages and the dense pages of protected layers."""

from nexusquant_vllm.native import e8_quantize as _e8_quantize
from nexusquant_vllm.native import paged_decode as _paged_decode
from nexusquant_vllm.native.e8_quantize import encode_kv, quantize, store_kv
from nexusquant_vllm.native.paged_decode import DENSE_DTYPES, decode_attention
from nexusquant_vllm.native.paged_decode import supports as decode_attention_supports

__all__ = [
    "DENSE_DTYPES", "available", "decode_attention", "decode_attention_supports", "encode_kv", "quantize", "store_kv",
]


def available() -> bool:
    """Whether both libraries were built (``pip install`` of this package builds them)."""
    return _e8_quantize.available() and _paged_decode.available()
