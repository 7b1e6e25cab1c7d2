"""Launch parameters of the Triton kernels on a GPU, per kernel and shape, chosen with the compile gate.

``benchmarks/compile_gate.py`` compiles every launch of the wrappers for sm_80 and sm_90 and fails on any register
spill; the values below are the smallest warp counts that compile without spills for each shape (more warps split
the same tiles over more threads, so each thread holds fewer registers; fewer warps keep more programs per SM).
``num_stages`` pipelines the loads of the attention kernels' page loops (2: 3 spilled the 4-bit decode on sm_80);
the store has no loop worth pipelining. None of this has been timed on a GPU yet: ``benchmarks/gpu_check.sh`` is
the prepared run that will.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexusquant_vllm.codec.format import KVFormat

REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
MAX_REGISTERS = 255  # per thread


@dataclass(frozen=True)
class LaunchParams:
    num_warps: int
    num_stages: int
    # Registers per thread ptxas may use: the register file's share of each thread of one program, or ptxas's own
    # choice (None). Without it ptxas stops at 128 for some 8-warp kernels and spills the rest; the decode kernel
    # up to head_dim 128 keeps ptxas's choice, fewer registers and more programs per SM for a loop bound by memory.
    full_registers: bool = True

    @property
    def maxnreg(self) -> int | None:
        return min(MAX_REGISTERS, REGISTER_FILE // (32 * self.num_warps)) if self.full_registers else None

    def kwargs(self) -> dict[str, int]:
        params = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return params if self.maxnreg is None else {**params, "maxnreg": self.maxnreg}


@dataclass(frozen=True)
class StoreParams(LaunchParams):
    block_t: int = 16  # tokens per program
    block_k: int = 32  # rows of the rotation matrix per step of the tile's rotation


def store(fmt: KVFormat) -> StoreParams:
    """The fused store: a program codes a tile of ``block_t`` vectors, whose groups (block_t * head_dim / 8) are
    searched side by side; the search state grows with them and with the 3-bit beam (4 candidates per group). 4
    warps hold 128 groups without the beam, 8 warps 256 groups, with the beam up to head_dim 128. head_dim 256
    takes 8 tokens per program, 4 with the beam (rotated without tensor cores, whose M is at least 16)."""
    beam = 3 in (fmt.k_bits, fmt.v_bits)
    block_t = 16 if fmt.head_dim <= 128 else 4 if beam else 8
    groups = block_t * fmt.head_dim // 8
    block_k = min(fmt.head_dim, 32) if block_t >= 16 else 8
    return StoreParams(4 if groups <= 128 and not beam else 8, 1, True, block_t, block_k)


def decode(head_dim: int) -> LaunchParams:
    """Split-KV decode: a [16, head_dim] accumulator and one decoded [BLOCK_N, head_dim] K and V tile. At head_dim
    256 (8 warps) ptxas's own ceiling of 128 registers spills the 3-bit pages on sm_90."""
    return LaunchParams(4 if head_dim <= 128 else 8, 2, full_registers=head_dim > 128)


@dataclass(frozen=True)
class PrefillParams(LaunchParams):
    block_m: int = 64  # query rows (tokens x GQA group) per program
    block_n: int = 32  # context tokens per tile


def prefill(head_dim: int) -> PrefillParams:
    """Continuation prefill: [block_m, head_dim] query and accumulator tiles and decoded [block_n, head_dim] K/V
    tiles. 8 warps hold 64 rows up to head_dim 128; head_dim 256 takes 32 rows."""
    return PrefillParams(4 if head_dim <= 64 else 8, 2, True, 64 if head_dim <= 128 else 32)
