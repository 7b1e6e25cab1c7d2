"""The deployment arithmetic of docs/scaling.md (benchmarks/scaling.py)."""

from __future__ import annotations

from benchmarks.scaling import Deployment, Model, eviction_traffic, kv_bytes_per_token_per_rank, markdown, rows


def test_bytes_per_token_per_rank_follow_the_model_and_the_slot_layout():
    model, dep = Model(), Deployment()
    assert kv_bytes_per_token_per_rank(model, dep, "bf16") == 80 * 1 * 128 * 2 * 2
    assert kv_bytes_per_token_per_rank(model, dep, "fp8") == 80 * 128 * 2
    assert kv_bytes_per_token_per_rank(model, dep, "e8-k3v2") == 80 * (16 * 3 + 16 * 2 + 4)
    assert kv_bytes_per_token_per_rank(model, dep, "e8-k3v2", protected=4) == 76 * 84 + 4 * 512
    assert kv_bytes_per_token_per_rank(model, dep, "e8-k3v2", 4, "e8-k4v4") == 76 * 84 + 4 * (2 * 64 + 2 * 2)
    assert kv_bytes_per_token_per_rank(model, Deployment(tp=16), "bf16") == 80 * 128 * 2 * 2  # heads replicated


def test_more_eviction_fits_more_users_and_the_document_shows_every_row():
    model, dep = Model(), Deployment()
    table = rows(model, dep)
    e8 = [r for r in table if r["cache"] == "e8-k3v2, no protection"]
    assert [r["eviction"] for r in e8] == [0.0, 0.35, 0.6, 0.8]
    assert all(a["users_per_node"] < b["users_per_node"] for a, b in zip(e8, e8[1:]))
    assert abs(e8[0]["vs_bf16"] - 40960 / 6720) < 1e-9
    text = markdown(model, dep, table, eviction_traffic(model, dep), {"gib_per_rank": 1.0, "gib_per_node": 8.0,
                                                                      "files_per_rank": 8192}, 0.94)
    assert text.count("| e8-k3v2, ") == 8 and "| bf16 | 0% |" in text
    assert eviction_traffic(model, dep)["bytes_to_engine_core"] == 131072 * 4
