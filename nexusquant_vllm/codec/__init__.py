"""Pure-torch E8 KV codec: rotation, E8 codebooks, bit packing, slot layout. No vLLM import."""

from nexusquant_vllm.codec.format import DEFAULT_DTYPE, E8_DTYPES, KVFormat, get_format
from nexusquant_vllm.codec.kv import (
    decode_kv,
    decode_kv_rotated,
    decode_vectors_rotated,
    encode_kv,
    encode_vectors,
    split_slots,
)
from nexusquant_vllm.codec.rotation import rotate, rotation_matrix, unrotate

__all__ = [
    "DEFAULT_DTYPE",
    "E8_DTYPES",
    "KVFormat",
    "decode_kv",
    "decode_kv_rotated",
    "decode_vectors_rotated",
    "encode_kv",
    "encode_vectors",
    "get_format",
    "rotate",
    "rotation_matrix",
    "split_slots",
    "unrotate",
]
