"""Compile gate: every Triton launch the host wrappers make, compiled for real NVIDIA targets on a machine without
a GPU, with the registers, shared memory and spills that ``ptxas`` reports.

The launches are captured, not rebuilt: each case calls the public wrapper (``store_kv``, ``decode_attention``,
``prefill_attention``) on small CPU tensors of the case's shape while Triton's JIT runs against a stand-in driver
that reports the target GPU. Triton's own binder then specializes the arguments exactly as it would on that GPU
(types, constexprs, 16-byte alignment, the wrapper's ``num_warps`` / ``num_stages``), and its cache hook hands the
specialization here instead of compiling and launching. Each distinct launch is then compiled with
``triton.compile`` for sm_80 and sm_90 (``ptxas -v`` log parsed), once per key.

Fails (exit 1) on a compile error, any spill store or load, shared memory above the smallest target's opt-in
limit per block, or a program whose registers exceed the register file (it could not launch). Writes ``benchmarks/results/compile_gate.{json,md}`` (or ``--name``).

    python -m benchmarks.compile_gate [--quick] [--name compile_gate] [--jobs N] [--out DIR]

Run without ``TRITON_INTERPRET`` (the script refuses it: interpreted kernels are not compiled).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas and print no log
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

TARGETS = (80, 90)
# Largest shared memory one block may opt in to (CUDA C programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGISTER_FILE = 65536  # 32-bit registers per SM on both: one program's threads must fit in it
HEAD_DIMS = (64, 128, 256)
GROUPS = (1, 4, 8)  # query heads per KV head
PAGES = (16, 32)
KERNELS = ("store", "decode", "prefill")
KV_HEADS = 2


@dataclass(frozen=True)
class Case:
    kernel: str  # "store", "decode" or "prefill"
    dtype: str  # an e8 dtype or "bf16" (the dense pages of protected layers)
    head_dim: int
    group: int
    page: int
    window: int | None = None  # a sliding window (prefill: its own kernel variant)
    softcap: float | None = None  # logit soft-capping (its own variant of both attention kernels)


@dataclass
class Row:
    kernel: str  # the Triton function
    cases: list[str]  # the wrapper cases that launch it
    target: int
    num_warps: int
    num_stages: int
    maxnreg: int | None  # the register ceiling asked of ptxas (None: its own choice)
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_stores == 0 and self.spill_loads == 0
                and self.shared <= min(SHARED_LIMIT.values())
                and self.registers * 32 * self.num_warps <= REGISTER_FILE)


def cases(quick: bool) -> list[Case]:
    """The matrix: every wrapper x dtype x head_dim at GQA 4 and page 16 (the axes that size the tiles, hence the
    registers: GQA groups up to 16 share one padded tile and the page only enters index arithmetic), plus GQA 1 and
    8 and page 32 for e8-k3v2 and bf16 at head_dim 128, and the sliding-window, soft-capped decode and prefill (Gemma
    2) for every dtype at head_dim 128 and e8-k3v2 and bf16 at every head_dim. ``quick``: head_dim 128 only."""
    from nexusquant_vllm.codec.format import E8_DTYPES

    dtypes = (*E8_DTYPES, "bf16")
    dims = (128,) if quick else HEAD_DIMS
    out = [Case(kernel, d, h, 4, PAGES[0]) for kernel, d, h in itertools.product(KERNELS, dtypes, dims)]
    for d in ("e8-k3v2", "bf16"):
        out += [Case(kernel, d, 128, g, PAGES[0]) for kernel in KERNELS[1:] for g in GROUPS if g != 4]
        out += [Case(kernel, d, 128, 4, page) for kernel in KERNELS for page in PAGES[1:]]
    out += [Case(kernel, d, h, 4, PAGES[0], window=64, softcap=50.0)
            for kernel, d, h in itertools.product(KERNELS[1:], dtypes, dims) if h == 128 or d in ("e8-k3v2", "bf16")]
    return out


# ---- capture -------------------------------------------------------------------------------------------------------

class _TargetDriver:
    """What Triton's JIT asks of the active driver before it compiles: the target (and a device id, here the arch,
    so that each target gets its own binder)."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass
class Launch:
    fn: Any  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict

    @property
    def key(self) -> str:
        return repr((self.fn.__name__, sorted(self.signature.items()), sorted(self.constants.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(self.options.items())))


@contextlib.contextmanager
def capturing(arch: int) -> Iterator[list[Launch]]:
    """Within the block, Triton launches are specialized for ``arch`` and recorded instead of compiled or run."""
    from triton import knobs
    from triton.runtime.driver import driver

    launches: list[Launch] = []

    def hook(*, fn, compile, **_: Any) -> bool:
        options = json.loads(compile["specialization_data"])["options"]  # every option, maxnreg included
        options = {k: _tuples(v) for k, v in options.items() if k not in ("extern_libs", "arch")}  # the target's own
        launches.append(Launch(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0],
                               options))
        return True  # "handled": the JIT neither compiles nor launches

    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active  # None: not created yet
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_TargetDriver(arch))
    try:
        yield launches
    finally:
        driver._active = previous_driver  # reset_active() would create the default driver, which needs a GPU
        knobs.runtime.jit_cache_hook = previous_hook


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples Triton's options hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def launch_case(case: Case) -> None:
    """Call the case's wrapper on CPU tensors of its shape (a few tokens: shapes, not sizes, set the launch)."""
    import torch

    from nexusquant_vllm.dtypes import get_format
    from nexusquant_vllm.kernels import decode_attention, prefill_attention, store_kv

    fmt = None if case.dtype == "bf16" else get_format(case.dtype, case.head_dim)
    width = 2 * case.head_dim if fmt is None else fmt.slot_bytes
    dtype = torch.bfloat16 if fmt is None else torch.uint8
    tokens, hq, d = 2 * case.page, KV_HEADS * case.group, case.head_dim
    cache = torch.zeros(4, KV_HEADS, case.page, width, dtype=dtype)
    k, v = torch.randn(tokens, KV_HEADS, d), torch.randn(tokens, KV_HEADS, d)
    if case.kernel == "store":
        store_kv(k, v, cache, torch.arange(tokens), fmt)
        return
    block_table = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    if case.kernel == "decode":
        decode_attention(torch.randn(1, hq, d), cache, block_table, torch.tensor([tokens], dtype=torch.int32),
                         d ** -0.5, fmt, max_seq_len=tokens, window=case.window, softcap=case.softcap)
        return
    starts = torch.tensor([0, tokens], dtype=torch.int32)
    prefill_attention(torch.randn(tokens, hq, d), k, v, cache, block_table, starts,
                      torch.tensor([2 * tokens], dtype=torch.int32), d ** -0.5, fmt, max_query_len=tokens,
                      window=case.window, softcap=case.softcap)


def capture_all(matrix: list[Case]) -> dict[tuple[int, str], tuple[Launch, list[str]]]:
    """(target, launch key) -> (launch, the cases that make it)."""
    launches: dict[tuple[int, str], tuple[Launch, list[str]]] = {}
    for arch in TARGETS:
        for case in matrix:
            with capturing(arch) as captured:
                launch_case(case)
            name = f"{case.kernel} {case.dtype} D={case.head_dim} G={case.group} page={case.page}" + (
                f" window={case.window} softcap={case.softcap}" if case.window else "")
            for launch in captured:
                launches.setdefault((arch, launch.key), (launch, []))[1].append(name)
    return launches


# ---- compile -------------------------------------------------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_launch(launch: Launch, arch: int, cases_: list[str]) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(launch.fn.__name__, cases_, arch, launch.options["num_warps"], launch.options["num_stages"],
              launch.options.get("maxnreg"))
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(launch.fn, launch.signature, launch.constants, launch.attrs),
                                    target=GPUTarget("cuda", arch, 32), options=launch.options)
    except Exception as e:  # noqa: BLE001 - a compile error is a result of the gate
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return row
    row.seconds = time.perf_counter() - t0
    row.shared = int(kernel.metadata.shared)
    text = log.getvalue()
    for field, pattern in _PTXAS.items():
        setattr(row, field, max((int(m) for m in pattern.findall(text)), default=0))
    return row


_PENDING: list[tuple[Launch, int, list[str]]] = []  # what forked compile workers read (JIT functions don't pickle)


def _compile_pending(i: int) -> Row:
    launch, arch, names = _PENDING[i]
    return compile_launch(launch, arch, names)


def run_gate(matrix: list[Case], jobs: int = 1, progress: Callable[[int, int], None] | None = None) -> list[Row]:
    """Capture every launch of ``matrix`` and compile each distinct one per target, over ``jobs`` processes."""
    launches = capture_all(matrix)
    order = sorted(launches.items(), key=lambda kv: (kv[0][0], kv[1][1][0]))
    _PENDING[:] = [(launch, arch, names) for (arch, _), (launch, names) in order]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = []
        for row in pool.map(_compile_pending, range(len(_PENDING))):
            rows.append(row)
            if progress:
                progress(len(rows), len(_PENDING))
    return rows


# ---- report --------------------------------------------------------------------------------------------------------

def markdown(rows: list[Row], command: str) -> str:
    lines = [f"```bash\n{command}\n```\n",
             "| kernel | first case (of n) | target | warps | stages | maxnreg | registers | shared (B) | spill st/ld (B) "
             "| ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "yes" if r.ok else ("ERROR: " + r.error if r.error else "NO")
        lines.append(f"| {r.kernel} | {r.cases[0]} ({len(r.cases)}) | sm_{r.target} | {r.num_warps} | "
                     f"{r.num_stages} | {r.maxnreg or '-'} | {r.registers} | {r.shared} | {r.spill_stores}/{r.spill_loads} | {status} |")
    bad = [r for r in rows if not r.ok]
    lines.append(f"\n{len(rows)} compiles, {len(bad)} failing (compile error, spills, shared memory above "
                 f"{min(SHARED_LIMIT.values())} B, or registers x threads above {REGISTER_FILE}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="head_dim 128 only")
    p.add_argument("--name", default="compile_gate", help="results/<name>.{json,md}")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the gate compiles the kernels, the interpreter does not")
    from tqdm import tqdm

    from benchmarks.results_io import RESULTS_DIR, write_results

    bar = tqdm(desc="compiling", unit="kernel")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    rows = run_gate(cases(args.quick), args.jobs, progress)
    bar.close()
    command = "python -m benchmarks.compile_gate " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip())
    payload = {"targets": TARGETS, "shared_limit": SHARED_LIMIT, "register_file": REGISTER_FILE,
               "rows": [asdict(r) for r in rows]}
    write_results(args.name, payload, table, args.out or RESULTS_DIR)
    print(table)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
