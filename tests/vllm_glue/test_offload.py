"""The compressed KV tier through vLLM (CPU, SmolLM2-135M, e8-k3v2, block size 32).

A second engine started on the same directory gets prefix hits for what the first one served, with identical
greedy outputs; damaged, swapped and truncated records are recomputed, never loaded (identical outputs again);
eviction runs beside the tier in vLLM's MultiConnector, and blocks computed over its holes are never saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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


def _prompt(tag: str, n: int = 24) -> str:
    body = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n))
    return f"{tag} {body} Question: who catalogued the logs? Answer:"


PROMPTS = [_prompt("Record A."), _prompt("Record B.", 20)]


def _run(llm_factory, model_path, config, prompts, max_tokens=16, **sp):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **sp)
    with llm_factory(model_path, "e8-k3v2", block_size=BLOCK_SIZE, max_model_len=1024,
                     kv_transfer_config=config) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs], \
        [len(o.prompt_token_ids) for o in outs]


def _records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.nqkv"))


@pytest.fixture(scope="module")
def first_server(tmp_path_factory, llm_factory, model_path):
    folder = tmp_path_factory.mktemp("tier")
    tokens, cached, lengths = _run(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=folder), PROMPTS)
    return folder, tokens, cached, lengths


def test_restart_serves_prefix_hits_from_disk_with_identical_outputs(first_server, llm_factory, model_path):
    folder, tokens, cached, lengths = first_server
    assert cached == [0, 0]
    full_blocks = sum((n - 1) // BLOCK_SIZE for n in lengths)
    assert len(_records(folder)) >= full_blocks  # every full prompt block (and completed output blocks)
    again, cached2, _ = _run(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=folder), PROMPTS)
    assert again == tokens
    assert cached2 == [(n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in lengths]


def test_damaged_records_are_recomputed_never_loaded(first_server, llm_factory, model_path, tmp_path):
    folder, tokens, _, _ = first_server
    damaged = tmp_path / "tier"
    import shutil

    shutil.copytree(folder, damaged)
    records = _records(damaged)
    records[0].write_bytes(records[0].read_bytes()[:-100])  # truncated
    data = bytearray(records[1].read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit
    records[2].write_bytes(bytes(data))
    swapped = records[3].read_bytes()
    records[3].write_bytes(records[4].read_bytes())  # another block's record under this key
    records[4].write_bytes(swapped)
    records[5].write_bytes(b"")
    again, _, _ = _run(llm_factory, model_path, kv_transfer_config(ram_gb=0.05, disk_dir=damaged), PROMPTS)
    assert again == tokens
    assert not any(p.exists() for p in records[:6] if p != records[1])  # rejected records are deleted


def test_eviction_beside_the_tier_never_saves_blocks_computed_over_holes(llm_factory, model_path, tmp_path):
    config = kv_transfer_config(ram_gb=0.05, disk_dir=tmp_path, eviction=0.35, min_prompt_tokens=256)
    prompt = _prompt("Record C.", 28)
    tokens, _, lengths = _run(llm_factory, model_path, config, [prompt], max_tokens=48)
    assert len(tokens[0]) == 48
    assert len(_records(tmp_path)) == lengths[0] // BLOCK_SIZE  # prompt blocks only, none of the output's
    plain = kv_transfer_config(ram_gb=0.05, disk_dir=tmp_path / "plain")
    _run(llm_factory, model_path, plain, [prompt], max_tokens=48)
    assert len(_records(tmp_path / "plain")) == (lengths[0] + 47) // BLOCK_SIZE  # without eviction: those too


def test_the_tier_needs_an_e8_dtype_and_recompute_on_load_failure(llm_factory, model_path, tmp_path):
    with pytest.raises(Exception, match="e8"):
        with llm_factory(model_path, "auto", kv_transfer_config=kv_transfer_config(disk_dir=tmp_path)):
            pass
    config = {**kv_transfer_config(disk_dir=tmp_path), "kv_load_failure_policy": "fail"}
    with pytest.raises(Exception, match="recompute"):
        with llm_factory(model_path, "e8-k3v2", kv_transfer_config=config):
            pass


def test_settings_are_validated():
    from nexusquant_vllm.vllm_glue.offload.params import OffloadSettings

    with pytest.raises(ValueError, match="ram_gb"):
        OffloadSettings.from_extra({"ram_gb": -1})
    with pytest.raises(ValueError, match="unknown"):
        OffloadSettings.from_extra({"disk_directory": "/x"})
    with pytest.raises(ValueError, match="needs"):
        OffloadSettings.from_extra({"ram_gb": 0})
    assert OffloadSettings.from_extra({"disk_dir": "/x", "ram_gb": 0}).ram_bytes == 0
