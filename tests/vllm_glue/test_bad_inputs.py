"""Every unsupported input fails at startup with one clear error (no engine is started)."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from nexusquant_vllm.vllm_glue.plugin import register

register()


def _fake_model(tmp_path: Path, model_path: str, name: str, **overrides) -> str:
    """A config-only copy of SmolLM2 with ``overrides`` applied (the checks run before weights load)."""
    d = tmp_path / name
    d.mkdir()
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg.update(overrides)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in Path(model_path).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    return str(d)


def _engine_config(model: str, kv_cache_dtype: str = "e8-k3v2"):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, kv_cache_dtype=kv_cache_dtype, max_model_len=512).create_engine_config()


def test_unknown_e8_name_lists_valid_names(model_path):
    with pytest.raises(ValueError, match=r"unknown nexusquant KV-cache dtype 'e8-k5v5'.*e8-k3v2.*e8-k2v2"):
        _engine_config(model_path, "e8-k5v5")


def test_unknown_e8_name_on_the_command_line(capsys):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "e8-k4v4"]).kv_cache_dtype == "e8-k4v4"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "e8-k9v9"])
    err = capsys.readouterr().err
    assert "e8-k9v9" in err and "e8-k3v2" in err


def test_head_dim_not_multiple_of_8(tmp_path, model_path):
    # 9 query heads x 60 = 540 != hidden 576 is fine for a config-only check.
    with pytest.raises(ValueError, match="head_dim 60 is not a multiple of 8"):
        _engine_config(_fake_model(tmp_path, model_path, "hd60", head_dim=60))


def test_sliding_window_refused(tmp_path, model_path):
    model = _fake_model(tmp_path, model_path, "swa", model_type="mistral", architectures=["MistralForCausalLM"],
                        sliding_window=256)
    with pytest.raises(ValueError, match="sliding-window attention layers are not supported"):
        _engine_config(model)


def test_mla_refused(tmp_path, model_path):
    model = _fake_model(
        tmp_path, model_path, "mla", model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
        kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=30, moe_intermediate_size=64,
    )
    with pytest.raises(ValueError, match="MLA attention"):
        _engine_config(model)


def test_unsupported_model_dtype():
    from nexusquant_vllm.vllm_glue.startup import check_model

    cfg = types.SimpleNamespace(
        use_mla=False, dtype=torch.float8_e4m3fn, is_hybrid=False, get_head_size=lambda: 64,
        get_sliding_window=lambda: None, hf_text_config=types.SimpleNamespace(layer_types=None),
    )
    with pytest.raises(ValueError, match="model dtype torch.float8_e4m3fn is not supported"):
        check_model(cfg)


def test_protected_layer_syntax():
    from nexusquant_vllm.vllm_glue.startup import protected_layers

    assert protected_layers(30, "2") == [0, 1, 28, 29]
    assert protected_layers(30, "none") == [] == protected_layers(30, "0")
    assert protected_layers(30, "0,5,29") == [0, 5, 29]
    assert protected_layers(30, "7,") == [7]
    assert protected_layers(4, "9") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="NEXUSQUANT_PROTECT_LAYERS"):
        protected_layers(30, "first-two")
    with pytest.raises(ValueError, match="out of range"):
        protected_layers(30, "3,30")


def test_self_check_rejects_a_layer_not_served_by_nexusquant(monkeypatch):
    """If routing ever misses a layer, the worker refuses to start instead of reading uint8 pages as bf16."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from nexusquant_vllm.vllm_glue import compat, startup
    from nexusquant_vllm.vllm_glue.backend import backend_for

    def layer(backend, dtype):
        return types.SimpleNamespace(get_attn_backend=lambda: backend, kv_cache_dtype=dtype)

    layers = {"l0": layer(backend_for("e8-k3v2"), "auto"), "l1": layer(CPUAttentionBackend, "e8-k3v2")}
    monkeypatch.setattr(compat, "attention_layers", lambda cfg: layers)
    runner = types.SimpleNamespace(vllm_config=types.SimpleNamespace(cache_config=types.SimpleNamespace(
        cache_dtype="e8-k3v2")))
    with pytest.raises(RuntimeError, match=r"self-check failed.*l1 \(CPU_ATTN"):
        startup.check_worker_layers(runner, {})


def test_enum_default_path_resolves():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from nexusquant_vllm.vllm_glue.backend import backend_for

    assert AttentionBackendEnum["NEXUSQUANT"].get_class() is backend_for("e8-k3v2")
