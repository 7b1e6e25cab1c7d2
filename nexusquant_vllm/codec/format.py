"""The honest byte layout of one token-head slot for each e8 KV-cache dtype.

One slot holds everything stored for one token of one KV head:

    [ K codes | V codes | K scale (fp16) | V scale (fp16) ]

K and V codes are E8 group indices, ``head_dim // 8`` groups each, ``bits`` bytes per group (2 bits/elem ->
one 16-bit index per 8 elements, 3 -> 24 bits, 4 -> 32 bits), little-endian. Nothing else is stored: the
rotation and codebooks are data-free constants.
"""

from __future__ import annotations

from dataclasses import dataclass

CODEC_VERSION = 1  # bump when stored codes change meaning (rotation, codebooks, slot layout): persisted pages miss
SUPPORTED_BITS = (2, 3, 4)
SCALE_BYTES = 2  # one fp16 scale per vector
GROUP = 8  # E8 works on groups of 8 elements

# name -> (key bits, value bits)
E8_DTYPES: dict[str, tuple[int, int]] = {
    "e8-k3v2": (3, 2),
    "e8-k2v2": (2, 2),
    "e8-k4v2": (4, 2),
    "e8-k3v3": (3, 3),
    "e8-k4v4": (4, 4),
}
DEFAULT_DTYPE = "e8-k3v2"


def check_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim % GROUP != 0:
        raise ValueError(f"head_dim must be a positive multiple of {GROUP} for E8 coding, got {head_dim}")


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits per element {bits!r}; supported: {SUPPORTED_BITS}")


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of E8 codes for one vector: ``head_dim / 8`` groups of ``bits`` bytes each."""
    check_head_dim(head_dim)
    check_bits(bits)
    return head_dim // GROUP * bits


@dataclass(frozen=True)
class KVFormat:
    """Byte layout of one token-head slot for an e8 dtype at a given head_dim."""

    name: str
    k_bits: int
    v_bits: int
    head_dim: int

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        check_bits(self.k_bits)
        check_bits(self.v_bits)

    @property
    def k_code_bytes(self) -> int:
        return code_bytes(self.head_dim, self.k_bits)

    @property
    def v_code_bytes(self) -> int:
        return code_bytes(self.head_dim, self.v_bits)

    @property
    def k_scale_offset(self) -> int:
        return self.k_code_bytes + self.v_code_bytes

    @property
    def v_scale_offset(self) -> int:
        return self.k_scale_offset + SCALE_BYTES

    @property
    def slot_bytes(self) -> int:
        """Bytes per token per KV head, codes and scales included."""
        return self.v_scale_offset + SCALE_BYTES

    @property
    def bits_per_element(self) -> float:
        """Stored bits per K/V element, scales included."""
        return self.slot_bytes * 8 / (2 * self.head_dim)

    def compression_vs(self, elem_bytes: int = 2) -> float:
        """Capacity ratio against a dense cache of ``elem_bytes`` per element (bf16/fp16: 2)."""
        return 2 * self.head_dim * elem_bytes / self.slot_bytes


def get_format(name: str, head_dim: int) -> KVFormat:
    """The ``KVFormat`` of an e8 dtype name; a clear ``ValueError`` lists the valid names otherwise."""
    if name not in E8_DTYPES:
        raise ValueError(f"unknown e8 KV-cache dtype {name!r}; valid names: {', '.join(E8_DTYPES)}")
    k_bits, v_bits = E8_DTYPES[name]
    return KVFormat(name, k_bits, v_bits, head_dim)
