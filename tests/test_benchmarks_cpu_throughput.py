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
