"""Every attention path against the torch path on the same inputs (the store's bytes, then decode-only and mixed
batches over E8 and dense pages with a hole), and the one function that chooses a layer's path.

The Triton path runs on the CPU interpreter without CUDA (see conftest.py)."""

import pytest
import torch

from nexusquant_vllm import native
from nexusquant_vllm.attention import (
    LayerKind,
    NativeCpuPath,
    StepBatch,
    TorchPath,
    TritonPath,
    build_path,
    choose_path,
)

HQ, HK, D, PAGE, NUM_BLOCKS = 4, 2, 32, 16, 12
TABLE = torch.tensor([[1, 2, 0, 0], [3, 0, 4, 5], [6, 7, 8, 9]], dtype=torch.int32)  # 0: null block (a hole)
SCALE = D**-0.5


def step_batch(q_lens: torch.Tensor, seq_lens: torch.Tensor, device: str) -> StepBatch:
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).int()])
    return StepBatch(query_start_loc.to(device), query_start_loc, seq_lens.int().to(device), seq_lens,
                     TABLE.to(device), int(q_lens.max()), int(seq_lens.max()), PAGE)


def slots_of(seq_lens: torch.Tensor) -> torch.Tensor:
    """vLLM's slot mapping for every position of every request (a hole's positions get -1, like padding)."""
    out = []
    for req, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        block = TABLE[req, pos // PAGE].long()
        out.append(torch.where(block > 0, block * PAGE + pos % PAGE, -1))
    return torch.cat(out)


def empty_cache(kind: LayerKind, device: str) -> torch.Tensor:
    pages = kind.pages()
    if pages.fmt is None:
        return torch.zeros(NUM_BLOCKS, HK, PAGE, 2 * D, dtype=torch.bfloat16, device=device)
    return torch.zeros(NUM_BLOCKS, HK, PAGE, pages.fmt.slot_bytes, dtype=torch.uint8, device=device)


@pytest.fixture(params=["native-cpu", "triton"])
def path_and_device(request):
    if request.param == "native-cpu":
        if not native.available():
            pytest.skip("native kernels not built")
        return NativeCpuPath, "cpu"
    return TritonPath, request.getfixturevalue("device")


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (24, None), (None, 1.5), (7, 1.5)],
                         ids=["full", "window-7", "window-24", "softcap", "window-7-softcap"])
@pytest.mark.parametrize("name", ["e8-k3v2", "e8-k4v4", None], ids=["e8-k3v2", "e8-k4v4", "dense"])
@pytest.mark.parametrize("query_lens", [(1, 1, 1), (1, 5, 3)], ids=["decode", "mixed"])
def test_every_path_matches_the_torch_path(name, query_lens, window, softcap, path_and_device):
    """Sliding windows of less than a page and of more than one, over contexts of 1-4 pages with a hole, and logit
    soft-capping (Gemma 2)."""
    path_cls, device = path_and_device
    gen = torch.Generator().manual_seed(0)
    kind = LayerKind(name or "e8-k3v2", name is not None, D, HQ, HK)
    reference, path = (cls(kind.pages(), SCALE, window, softcap) for cls in (TorchPath, path_cls))
    seq_lens = torch.tensor([20, 61, 40])
    q_lens = torch.tensor(query_lens)
    cached = seq_lens - q_lens
    k_ctx, v_ctx = (torch.randn(int(seq_lens.sum()), HK, D, generator=gen).bfloat16() for _ in range(2))
    slots = slots_of(seq_lens)

    want, got = empty_cache(kind, "cpu"), empty_cache(kind, device)
    reference.store(k_ctx, v_ctx, want, slots)
    path.store(k_ctx.to(device), v_ctx.to(device), got, slots.to(device))
    same = (want == got.cpu()).float().mean()
    assert same > 0.95, f"stores agree on {float(same):.1%} of the bytes"

    # this step's tokens: positions cached..seq_len of each request, over the cached part of the reference's pages
    rows = torch.cat([torch.arange(int(s) - int(c)) + int(c) for s, c in zip(seq_lens, cached)])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), seq_lens.cumsum(0)[:-1]])
    flat = torch.cat([starts[r] + torch.arange(int(cached[r]), int(seq_lens[r])) for r in range(3)])
    assert flat.shape == rows.shape
    q = torch.randn(len(flat), HQ, D, generator=gen).bfloat16()
    k, v = k_ctx[flat], v_ctx[flat]
    expected = torch.zeros(len(flat), HQ, D)
    reference.attend(q, k, v, want, TorchPath.plan(step_batch(q_lens, seq_lens, "cpu")), expected)
    out = torch.zeros(len(flat), HQ, D, device=device)
    path.attend(q.to(device), k.to(device), v.to(device), want.to(device),
                path_cls.plan(step_batch(q_lens, seq_lens, device)), out)
    err = (out.cpu() - expected).abs().max() / expected.abs().max()
    assert float(err) < (1e-4 if path_cls is NativeCpuPath else 1e-2)


def _kind(dtype="e8-k3v2", coded=True, head_dim=64, heads=(9, 3)) -> LayerKind:
    return LayerKind(dtype, coded, head_dim, *heads)


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
@pytest.mark.parametrize("device_type,kind,attention,interpreter,expected", [
    ("cpu", _kind(), "auto", False, NativeCpuPath),
    ("cpu", _kind(coded=False), "auto", False, NativeCpuPath),
    ("cpu", _kind("scalar-k3v2"), "auto", False, TorchPath),  # the baselines have no kernel
    ("cpu", _kind("scalar-k3v2", coded=False), "auto", False, NativeCpuPath),
    ("cpu", _kind(heads=(64, 2)), "auto", False, TorchPath),  # GQA 32 is past the native kernel's limit
    ("cpu", _kind(), "auto", True, NativeCpuPath),  # the interpreter alone does not pick Triton
    ("cpu", _kind(), "torch", False, TorchPath),
    ("cpu", _kind(coded=False), "native", False, NativeCpuPath),
    ("cpu", _kind(), "triton", True, TritonPath),
    ("cpu", _kind(coded=False), "triton", True, TritonPath),
    ("cuda", _kind(), "auto", False, TritonPath),
    ("cuda", _kind(coded=False), "auto", False, TritonPath),
    ("cuda", _kind("scalar-k3v2"), "auto", False, TorchPath),
    ("cuda", _kind("scalar-k3v2", coded=False), "auto", False, TorchPath),
    ("cuda", _kind(head_dim=80), "auto", False, TorchPath),  # not a power of two: no Triton kernel
    ("cuda", _kind(), "torch", False, TorchPath),
    ("xpu", _kind(), "auto", False, TorchPath),
])
def test_choose_path(device_type, kind, attention, interpreter, expected):
    assert choose_path(device_type, kind, attention, interpreter) is expected
    # a run's E8 and protected layers get the same kind of plan: one metadata builder serves both
    dense = LayerKind(kind.run_dtype, not kind.coded, kind.head_dim, kind.num_heads, kind.num_kv_heads)
    assert choose_path(device_type, dense, attention, interpreter).plan is expected.plan


@pytest.mark.parametrize("device_type,kind,attention,interpreter,message", [
    ("cpu", _kind(), "triton", False, "TRITON_INTERPRET=1"),
    ("cuda", _kind(head_dim=80), "triton", False, "power-of-two head_dim"),
    ("cuda", _kind("scalar-k3v2"), "triton", False, "needs an e8 dtype"),
    ("cuda", _kind(), "native", False, "CPU only"),
    ("cpu", _kind("scalar-k3v2"), "native", False, "serve e8 dtypes"),
    ("cpu", _kind(heads=(64, 2)), "native", False, "up to 16 query heads"),
])
def test_an_explicit_choice_that_cannot_serve_the_layer_is_an_error(device_type, kind, attention, interpreter,
                                                                     message):
    with pytest.raises(ValueError, match=message):
        build_path(device_type, kind, SCALE, attention, interpreter)


def poison_tails(cache: torch.Tensor, kind: LayerKind, seq_lens: torch.Tensor) -> torch.Tensor:
    """A copy of ``cache`` whose slots past each request's context in its last block, and whose unused blocks, read
    back as NaN (what a reused block can hold: vLLM does not clear it, and an inf input is stored as a NaN scale)."""
    poisoned = cache.clone()
    fmt = kind.pages().fmt
    used = torch.zeros(NUM_BLOCKS, PAGE, dtype=torch.bool)
    for req, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        block = TABLE[req, pos // PAGE].long()
        used[block[block > 0], (pos % PAGE)[block > 0]] = True
    stale = ~used
    stale[0] = False  # the null block itself: never read by any path (tested elsewhere)
    blocks, offsets = stale.nonzero(as_tuple=True)
    if fmt is None:
        poisoned[blocks, :, offsets] = float("nan")
    else:
        nan = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8)  # fp16 NaN, little-endian bytes
        for offset in (fmt.k_scale_offset, fmt.v_scale_offset):
            poisoned[blocks, :, offsets, offset : offset + 2] = nan
    return poisoned


@pytest.mark.parametrize("name", ["e8-k3v2", None], ids=["e8-k3v2", "dense"])
@pytest.mark.parametrize("query_lens", [(1, 1, 1), (1, 5, 3)], ids=["decode", "mixed"])
@pytest.mark.parametrize("path_name", ["torch", "native-cpu", "triton"])
def test_stale_nan_slots_past_the_context_are_never_attended(name, query_lens, path_name, request):
    """Every path masks by selection: NaN in the unused tail of a request's last block (and in unused blocks) leaves
    the output equal to the one over a clean cache."""
    if path_name == "native-cpu" and not native.available():
        pytest.skip("native kernels not built")
    path_cls, device = {"torch": (TorchPath, "cpu"), "native-cpu": (NativeCpuPath, "cpu")}.get(path_name, (None, None))
    if path_name == "triton":
        path_cls, device = TritonPath, request.getfixturevalue("device")
    gen = torch.Generator().manual_seed(1)
    kind = LayerKind(name or "e8-k3v2", name is not None, D, HQ, HK)
    q_lens, cached = torch.tensor(query_lens), torch.tensor([20, 45, 40])
    seq_lens = cached + q_lens
    clean = empty_cache(kind, "cpu")
    TorchPath(kind.pages(), SCALE).store(*(torch.randn(int(cached.sum()), HK, D, generator=gen) for _ in range(2)),
                                         clean, slots_of(cached))
    n = int(q_lens.sum())
    q, k, v = torch.randn(n, HQ, D, generator=gen), *(torch.randn(n, HK, D, generator=gen) for _ in range(2))
    path = path_cls(kind.pages(), SCALE)
    outs = []
    for cache in (clean, poison_tails(clean, kind, cached)):
        out = torch.zeros(n, HQ, D, device=device)
        path.attend(q.to(device), k.to(device), v.to(device), cache.to(device),
                    path_cls.plan(step_batch(q_lens, seq_lens, device)), out)
        outs.append(out.cpu())
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("path_name", ["torch", "native-cpu"])
def test_first_chunks_skip_the_rotation_with_the_same_output(path_name):
    """A step of first prefill chunks reads no page, so it attends in the model's domain; the output equals attention
    in the pages' rotated domain, un-rotated."""
    if path_name == "native-cpu" and not native.available():
        pytest.skip("native kernels not built")
    path_cls = {"torch": TorchPath, "native-cpu": NativeCpuPath}[path_name]
    gen = torch.Generator().manual_seed(2)
    kind = LayerKind("e8-k3v2", True, D, HQ, HK)
    path, cache = path_cls(kind.pages(), SCALE), empty_cache(kind, "cpu")
    q_lens = torch.tensor([5, 9, 3])
    n = int(q_lens.sum())
    q, k, v = torch.randn(n, HQ, D, generator=gen), *(torch.randn(n, HK, D, generator=gen) for _ in range(2))
    plan = path_cls.plan(step_batch(q_lens, q_lens, "cpu"))
    assert all(grp.num_ctx_blocks == 0 for grp in plan)
    out, rotated = torch.zeros(n, HQ, D), torch.zeros(n, HQ, D)
    path.attend(q, k, v, cache, plan, out)
    pages = path.pages
    path._attend(pages.to_pages(q), pages.to_pages(k), pages.to_pages(v), cache, plan, rotated)
    torch.testing.assert_close(out, pages.to_model(rotated), atol=1e-5, rtol=1e-5)
