"""Native CPU kernels (C++ in ``csrc/``, built by ``setup.py``, loaded through ctypes)."""

from nexusquant_vllm.native.e8_quantize import available, encode_kv, quantize

__all__ = ["available", "encode_kv", "quantize"]
