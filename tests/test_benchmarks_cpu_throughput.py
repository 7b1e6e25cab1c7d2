"""The CPU throughput benchmark's kernel mode and machine record on a tiny context (the engine mode needs minutes)."""

from benchmarks.cpu_throughput import kernel_rows, kernel_table, machine


def test_kernel_rows_count_the_bytes_each_page_kind_reads():
    rows = kernel_rows([64], ["e8-k3v2", "e8-k4v4"])
    by_dtype = {r["dtype"]: r for r in rows}
    assert by_dtype["bf16"]["bytes_per_token_head"] == 2 * 64 * 2  # K and V, bf16
    assert by_dtype["e8-k3v2"]["bytes_per_token_head"] == 44  # 24 + 16 code bytes + two fp16 scales
    assert by_dtype["e8-k4v4"]["bytes_per_token_head"] == 68
    assert all(r["ms_per_step_and_layer"] > 0 for r in rows)
    assert kernel_table(rows).count("| 64 |") == 3


def test_machine_record_has_the_rates_that_change_every_ratio():
    m = machine()
    assert m["fp32_matmul_gflops_1_core"] > 0 and m["bf16_matmul_gflops_1_core"] > 0
    assert m["copy_gb_per_s_1_core"] > 0 and m["cores"] >= 1


def test_path_timers_count_a_delegating_call_once_and_restore_the_paths():
    import time

    import torch

    from benchmarks.cpu_throughput import path_timers
    from nexusquant_vllm.attention import LayerKind, NativeCpuPath, TorchPath
    from nexusquant_vllm.attention.paged import plan_groups

    before = (TorchPath.__dict__["attend"], NativeCpuPath.__dict__["attend"])
    path = NativeCpuPath(LayerKind("e8-k3v2", True, 64, 9, 3).pages(), 0.125)
    cache = torch.zeros(4, 3, 16, path.pages.fmt.slot_bytes, dtype=torch.uint8)
    plan = plan_groups(torch.tensor([0, 8]), torch.tensor([24]), torch.tensor([[1, 2]]), 16)  # one prefill chunk
    with path_timers() as spent:
        path.store(torch.randn(24, 3, 64), torch.randn(24, 3, 64), cache, torch.arange(16, 40))
        t = time.perf_counter()
        path.attend(torch.randn(8, 9, 64), torch.randn(8, 3, 64), torch.randn(8, 3, 64), cache, plan,
                    torch.zeros(8, 9, 64))  # NativeCpuPath.attend -> TorchPath.attend: counted once
        wall = time.perf_counter() - t
    assert spent["store"] > 0 and 0 < spent["attend"] <= wall
    assert (TorchPath.__dict__["attend"], NativeCpuPath.__dict__["attend"]) == before
