"""The compressed KV tier through vLLM (CPU, SmolLM2-135M, e8-k3v2, block size 32).

A second engine started on the same directory gets prefix hits for what the first one served, with the greedy
outputs of a prefix-cache hit in the first engine (the same pages, loaded from disk instead of kept in the pool);
damaged, swapped, foreign and truncated records are recomputed, never loaded (the outputs of a cold run); eviction
runs beside the tier in vLLM's MultiConnector, and blocks computed over its holes are never saved; a model with
sliding-window layers beside global ones restarts from disk too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nexusquant_vllm.vllm_glue import compat
from nexusquant_vllm.vllm_glue.offload import kv_transfer_config
from nexusquant_vllm.vllm_glue.plugin import register

register()

BLOCK_SIZE = 32
SENTENCES = [
    "The archive in Tellin keeps ship logs from the years when the harbour froze every winter.",
    "A clerk named Odile Marsh catalogued them by hand and wrote the shelf number on each spine.",
    "Visitors may read the logs on Tuesdays, wearing cotton gloves the archive provides at the door.",
    "The oldest log, from 1794, describes a cargo of tea, indigo and forty barrels of lamp oil.",
]


def _prompt(tag: str, n: int) -> str:
    body = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n))
    return f"{tag} {body} Question: who catalogued the logs? Answer:"


@pytest.fixture(scope="module")
def prompts(model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok(_prompt(tag, n)).input_ids for tag, n in (("Record A.", 24), ("Record B.", 20), ("Record C.", 22))]


def _generate(llm, prompts, max_tokens=16):
    """One prompt at a time: each prefills in one chunk, whatever the engine's timing (an e8 output depends on
    where chunks start: a chunk attends to its own raw K/V and to earlier tokens' pages)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = [llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0] for p in prompts]
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def _engine(llm_factory, model_path, config, **kw):
    return llm_factory(model_path, "e8-k3v2", block_size=BLOCK_SIZE, max_model_len=1024, kv_transfer_config=config,
                       **kw)


def _records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.nqkv"))


def _hit(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="module")
def first_server(tmp_path_factory, llm_factory, model_path, prompts):
    """Cold outputs, then the outputs of a full prefix-cache hit in the same engine."""
    folder = tmp_path_factory.mktemp("tier")
    with _engine(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=folder)) as llm:
        cold, cached_cold = _generate(llm, prompts)
        warm, cached_warm = _generate(llm, prompts)
    assert cached_cold == [0, 0, 0] and cached_warm == [_hit(p) for p in prompts]
    return folder, cold, warm


def test_restart_serves_prefix_hits_from_disk_with_identical_outputs(first_server, llm_factory, model_path, prompts):
    folder, _, warm = first_server
    keys = [compat.block_hashes(p, BLOCK_SIZE) for p in prompts]
    assert all(any(k.hex() in r.name for r in _records(folder)) for ks in keys for k in ks)  # every full block
    before = _counters()
    with _engine(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=folder),
                 disable_log_stats=False) as llm:  # vLLM's stat loggers, Prometheus included, run in this process
        again, cached = _generate(llm, prompts)
    assert cached == [_hit(p) for p in prompts]
    assert again == warm
    after = _counters()
    blocks = sum(_hit(p) for p in prompts) // BLOCK_SIZE
    assert after["disk_hits"] - before["disk_hits"] == blocks
    assert after["hit_tokens"] - before["hit_tokens"] == blocks * BLOCK_SIZE
    assert after["bad_records"] == before["bad_records"]


def _counters() -> dict[str, float]:
    """The tier's counters in the Prometheus registry that a server's /metrics serves."""
    from prometheus_client import REGISTRY

    samples = [s for metric in REGISTRY.collect() for s in metric.samples]
    return {name: sum(s.value for s in samples if s.name == f"vllm:nq_offload_{name}_total")
            for name in ("disk_hits", "hit_tokens", "bad_records")}


def test_damaged_records_are_recomputed_never_loaded(first_server, llm_factory, model_path, prompts, tmp_path):
    """Each prompt's first block is damaged another way: nothing of it may load, so it computes cold."""
    folder, cold, _ = first_server
    damaged = tmp_path / "tier"
    shutil.copytree(folder, damaged)
    path = {r.stem: r for r in _records(damaged)}
    firsts = [path[compat.block_hashes(p, BLOCK_SIZE)[0].hex()] for p in prompts]
    seconds = [path[compat.block_hashes(p, BLOCK_SIZE)[1].hex()] for p in prompts]
    firsts[0].write_bytes(firsts[0].read_bytes()[:-100])  # truncated
    data = bytearray(firsts[1].read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit
    firsts[1].write_bytes(bytes(data))
    firsts[2].write_bytes(seconds[0].read_bytes())  # another block's record under this key
    with _engine(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=damaged)) as llm:
        again, _ = _generate(llm, prompts)
    assert again == cold
    assert not any(p.exists() for p in firsts)  # rejected records are deleted
    assert all(p.exists() for p in seconds)


def test_eviction_beside_the_tier_never_saves_blocks_computed_over_holes(llm_factory, model_path, prompts, tmp_path):
    config = kv_transfer_config(ram_gb=0.05, disk_dir=tmp_path, eviction=0.35, min_prompt_tokens=256)
    prompt = prompts[0]
    with _engine(llm_factory, model_path, config) as llm:
        tokens, _ = _generate(llm, [prompt], max_tokens=48)
    assert len(tokens[0]) == 48
    assert len(_records(tmp_path)) == len(prompt) // BLOCK_SIZE  # prompt blocks only, none of the output's
    with _engine(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=tmp_path / "plain")) as llm:
        _generate(llm, [prompt], max_tokens=48)
    assert len(_records(tmp_path / "plain")) == (len(prompt) + 47) // BLOCK_SIZE  # without eviction: those too


def test_a_model_with_sliding_window_layers_restarts_from_disk(llm_factory, prompts, tmp_path):
    """Gemma 3's sliding-window layers beside a global one (a tiny random model): with a connector installed vLLM
    keeps every block, so the tier stores every full prompt block and a restarted engine decodes from them as the first
    engine did from its own prefix cache."""
    from benchmarks.tiny_models import tiny_model

    model = str(tiny_model("gemma3"))
    config = kv_transfer_config(ram_gb=0.05, disk_dir=tmp_path)
    with _engine(llm_factory, model, config) as llm:
        _generate(llm, prompts)
        warm, _ = _generate(llm, prompts)
    assert len(_records(tmp_path)) >= sum(len(p) // BLOCK_SIZE for p in prompts)  # and blocks of the outputs
    with _engine(llm_factory, model, config) as llm:
        again, cached = _generate(llm, prompts)
    assert cached == [_hit(p) for p in prompts] and again == warm


def test_the_tier_needs_an_e8_dtype_recompute_on_load_failure_and_prefix_caching(llm_factory, model_path, tmp_path):
    with pytest.raises(ValueError, match="e8"):
        with llm_factory(model_path, "auto", kv_transfer_config=kv_transfer_config(disk_dir=tmp_path)):
            pass
    config = {**kv_transfer_config(disk_dir=tmp_path), "kv_load_failure_policy": "fail"}
    with pytest.raises(ValueError, match="recompute"):
        with llm_factory(model_path, "e8-k3v2", kv_transfer_config=config):
            pass
    with pytest.raises(ValueError, match="prefix caching"):
        with llm_factory(model_path, "e8-k3v2", kv_transfer_config=kv_transfer_config(disk_dir=tmp_path),
                         enable_prefix_caching=False):
            pass


def test_settings_are_validated():
    from nexusquant_vllm.vllm_glue.offload.params import OffloadSettings

    with pytest.raises(ValueError, match="ram_gb"):
        OffloadSettings.from_extra({"ram_gb": -1})
    with pytest.raises(ValueError, match="unknown"):
        OffloadSettings.from_extra({"disk_directory": "/x"})
    with pytest.raises(ValueError, match="needs"):
        OffloadSettings.from_extra({"ram_gb": 0})
    with pytest.raises(ValueError, match="transform"):
        OffloadSettings.from_extra({"transforms": {"codes": "delta_planes"}})
    assert OffloadSettings.from_extra({"disk_dir": "/x", "ram_gb": 0}).ram_bytes == 0


def test_the_eviction_default_joins_a_configured_tier_and_refuses_other_connectors(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vllm.config import KVTransferConfig

    from nexusquant_vllm.vllm_glue.startup import before_engine_config

    monkeypatch.setenv("NEXUSQUANT_EVICTION", "conservative")
    tier = KVTransferConfig(**kv_transfer_config(disk_dir=str(tmp_path)))
    args = SimpleNamespace(kv_transfer_config=tier, kv_cache_dtype="e8-k3v2", additional_config={})
    before_engine_config(args)
    assert args.kv_transfer_config.kv_connector == "MultiConnector"
    entries = args.kv_transfer_config.kv_connector_extra_config["connectors"]
    assert [e["kv_connector"] for e in entries] == ["NQEvictionConnector", "NQOffloadConnector"]
    assert entries[0]["kv_connector_extra_config"]["eviction"] == "conservative"
    assert entries[1]["kv_load_failure_policy"] == args.kv_transfer_config.kv_load_failure_policy == "recompute"
    other = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with pytest.raises(ValueError, match="ExampleConnector"):
        before_engine_config(SimpleNamespace(kv_transfer_config=other, kv_cache_dtype="e8-k3v2", additional_config={}))


def test_the_connectors_are_known_to_vllm_by_name():
    """``--kv-transfer-config '{"kv_connector": "NQOffloadConnector", ...}'`` needs no module path (and vLLM's
    MultiConnector rebuilds its children's stats by name)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from nexusquant_vllm.vllm_glue.eviction.connector import NQEvictionConnector
    from nexusquant_vllm.vllm_glue.offload.connector import NQOffloadConnector

    for cls in (NQOffloadConnector, NQEvictionConnector):
        config = KVTransferConfig(kv_connector=cls.__name__, kv_role="kv_both")
        assert KVConnectorFactory.get_connector_class(config) is cls
        assert KVConnectorFactory.get_connector_class_by_name(cls.__name__) is cls


def test_the_model_fingerprint_follows_the_weights_not_their_copy_time(tmp_path):
    import os
    from types import SimpleNamespace

    from nexusquant_vllm.vllm_glue.offload.params import model_fingerprint

    def fingerprint(folder: Path) -> str:
        return model_fingerprint(SimpleNamespace(model=str(folder), revision=None, dtype="bfloat16",
                                                 quantization=None, hf_config=None))

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 40_000)
    first = fingerprint(tmp_path)
    weights.write_bytes(weights.read_bytes())  # the same weights copied again, at another time
    os.utime(weights, (1, 1))
    assert fingerprint(tmp_path) == first
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(tmp_path) != first  # same size, other weights
