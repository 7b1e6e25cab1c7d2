"""Every unsupported input fails with one clear error: at startup (no engine is started) for dtype names and models;
over HTTP with a 400 naming the field for bad requests, after which the same server keeps serving."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("name", ["e8-", "e8-k3v2 ", "e8-k3v2\n", "e8-k3", "e8-k3v2-fast"])
def test_malformed_e8_names_are_refused_by_name(model_path, name):
    message = (f"unknown nexusquant KV-cache dtype {name!r}; valid e8 dtypes: e8-k3v2, e8-k2v2, e8-k4v2, e8-k3v3, "
               "e8-k4v4 (default e8-k3v2)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _engine_config(model_path, name)


@pytest.mark.parametrize("name", ["E8-K3V2", " e8-k3v2", "e8_k3v2", "e8"])
def test_names_outside_the_e8_prefix_get_vllms_error(model_path, name):
    """Like vLLM's own names (``FP8`` is refused too), dtype names are case-sensitive and not stripped: vLLM's
    validation refuses them, listing the valid values, e8 ones included."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"(?s)cache_dtype.*Input should be .*'e8-k3v2'") as error:
        _engine_config(model_path, name)
    assert f"input_value={name!r}" in str(error.value)


def test_head_dim_not_multiple_of_8(tmp_path, model_path):
    # 9 query heads x 60 = 540 != hidden 576 is fine for a config-only check.
    with pytest.raises(ValueError, match="head_dim 60 is not a multiple of 8"):
        _engine_config(_fake_model(tmp_path, model_path, "hd60", head_dim=60))


def _engine_config_with(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, kv_cache_dtype="e8-k3v2", max_model_len=512, **kwargs).create_engine_config()


def test_sliding_window_models_are_served_but_not_evicted(tmp_path, model_path):
    """Sliding-window layers are served (the window applied in every attention path); eviction, whose compaction
    moves tokens to other positions, is refused for such a model."""
    from nexusquant_vllm.vllm_glue.eviction.params import kv_transfer_config

    model = _fake_model(tmp_path, model_path, "swa", model_type="mistral", architectures=["MistralForCausalLM"],
                        sliding_window=256)
    assert _engine_config(model).model_config.get_sliding_window() == 256
    with pytest.raises(ValueError, match=r"eviction cannot serve a model with sliding-window attention layers"):
        _engine_config_with(model, kv_transfer_config=kv_transfer_config("balanced"))


def test_the_offload_tier_is_refused_where_every_layer_has_a_window(tmp_path, model_path):
    """vLLM frees the blocks that leave a window before the tier could store them (measured: 6 of 27 blocks stored,
    no hit after a restart); where windows mix, vLLM keeps every block once a connector is installed."""
    from nexusquant_vllm.vllm_glue.offload import kv_transfer_config as tier

    model = _fake_model(tmp_path, model_path, "swa", model_type="mistral", architectures=["MistralForCausalLM"],
                        sliding_window=256)
    with pytest.raises(ValueError, match=r"offload tier cannot serve a model whose every layer has a sliding window"):
        _engine_config_with(model, kv_transfer_config=tier(disk_dir=str(tmp_path / "tier")))


@pytest.mark.parametrize("name, overrides", [
    ("gemma3", dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=256, sliding_window=512,
                    layer_types=["sliding_attention"] * 5 + ["full_attention"] * 25)),
    ("gemma2", dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=64, sliding_window=256,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=64)),
])
def test_interleaved_windows_and_soft_capping_are_accepted(tmp_path, model_path, name, overrides):
    assert _engine_config(_fake_model(tmp_path, model_path, name, **overrides)).cache_config.cache_dtype == "e8-k3v2"


def test_attention_sinks_refused_naming_the_alternative(tmp_path, model_path):
    model = _fake_model(tmp_path, model_path, "gpt-oss", model_type="gpt_oss", architectures=["GptOssForCausalLM"],
                        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 15,
                        num_local_experts=4, num_experts_per_tok=2, head_dim=64)
    with pytest.raises(ValueError, match=r"attention sinks .*not supported.*--kv-cache-dtype auto"):
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


def test_every_problem_of_a_model_in_one_error():
    from nexusquant_vllm.vllm_glue.startup import check_model

    cfg = types.SimpleNamespace(
        use_mla=True, dtype=torch.bfloat16, is_hybrid=True, get_head_size=lambda: 100,
        get_sliding_window=lambda: 4096,
        hf_text_config=types.SimpleNamespace(layer_types=None, model_type="gpt_oss"),
    )
    with pytest.raises(ValueError) as error:
        check_model(cfg)
    assert str(error.value) == (
        "nexusquant e8 KV cache cannot serve this model: MLA attention (compressed latent KV) is not supported; use a "
        "model with standard attention; head_dim 100 is not a multiple of 8 (E8 codes 8-element groups); hybrid models "
        "(attention + Mamba/linear attention) are not supported; attention sinks (GPT-OSS) are not supported. Serve "
        "it with --kv-cache-dtype auto or fp8"
    )


def test_protected_layer_syntax():
    from nexusquant_vllm.config import parse_protect_layers

    assert parse_protect_layers("2", 30) == [0, 1, 28, 29]
    assert parse_protect_layers("none", 30) == [] == parse_protect_layers("0", 30)
    assert parse_protect_layers("0,5,29", 30) == [0, 5, 29]
    assert parse_protect_layers("7,", 30) == [7]
    assert parse_protect_layers("9", 4) == [0, 1, 2, 3]
    assert parse_protect_layers("auto", 30) == [0, 1, 28, 29]
    assert parse_protect_layers("auto", 30, mixed_windows=True) == []  # one page size for all: no protection
    assert parse_protect_layers("2", 30, mixed_windows=True) == [0, 1, 28, 29]  # an explicit choice is applied
    with pytest.raises(ValueError, match="NEXUSQUANT_PROTECT_LAYERS"):
        parse_protect_layers("first-two", 30)
    with pytest.raises(ValueError, match="out of range"):
        parse_protect_layers("3,30", 30)


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


# ---- over HTTP: one server (e8-k3v2, eviction connector on) answers every bad request with a 400 naming the field ----

HTTP_MAX_MODEL_LEN = 256
RATE_ERROR = "nq_eviction must be a number in [0, 1) or one of ['lossless', 'conservative', 'balanced', 'aggressive']"
PROTECT_ERROR = ("nq_eviction_protect must be a list of [start, end) token ranges with 0 <= start <= end (nested, or "
                 "flat [s0, e0, s1, e1, ...])")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from benchmarks.soak import launch_server

    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    args = ["--kv-cache-dtype", "e8-k3v2", "--max-model-len", str(HTTP_MAX_MODEL_LEN), "--enforce-eager",
            "--kv-transfer-config", json.dumps(kv_transfer_config("lossless"))]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with launch_server(model_path, args, log, {"VLLM_CPU_KVCACHE_SPACE": "1"}) as srv:
        yield srv


def _complete(server, prompt="The capital of France is", **body):
    import httpx

    body = {"model": "smol", "prompt": prompt, "max_tokens": 2, "temperature": 0, **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def _assert_400(resp, param: str, message: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize("xargs,param,message", [
    ({"nq_eviction": -0.5}, "nq_eviction", "nq_eviction must be in [0, 1), got -0.5"),
    ({"nq_eviction": 1.5}, "nq_eviction", "nq_eviction must be in [0, 1), got 1.5"),
    ({"nq_eviction": 1}, "nq_eviction", "nq_eviction must be in [0, 1), got 1.0"),
    ({"nq_eviction": "nan"}, "nq_eviction", "nq_eviction must be in [0, 1), got nan"),
    ({"nq_eviction": "abc"}, "nq_eviction", f"{RATE_ERROR}, got 'abc'"),
    ({"nq_eviction": "ultra"}, "nq_eviction", f"{RATE_ERROR}, got 'ultra'"),  # unknown preset
    ({"nq_eviction": [0.1]}, "nq_eviction", f"{RATE_ERROR}, got [0.1]"),
    ({"nq_eviction": True}, "nq_eviction", "nq_eviction must be in [0, 1), got 1.0"),  # vLLM's schema makes it 1
    ({"nq_eviction_protect": [9, 3]}, "nq_eviction_protect", f"{PROTECT_ERROR}, got [9, 3]"),
    ({"nq_eviction_protect": [3, 9, 12]}, "nq_eviction_protect", f"{PROTECT_ERROR}, got [3, 9, 12]"),
    ({"nq_eviction_protect": "0-10"}, "nq_eviction_protect", f"{PROTECT_ERROR}, got '0-10'"),
    ({"nq_eviction_protect": [0, 0] * 1025}, "nq_eviction_protect",
     "nq_eviction_protect may hold at most 1024 ranges, got 1025"),
    ({"nq_eviction_at": 0}, "nq_eviction_at", "nq_eviction_at must be a token count >= 1, got 0"),
    ({"nq_eviction_at": "64"}, "nq_eviction_at", "nq_eviction_at must be a token count >= 1, got '64'"),
    ({"nq_evction": 0.2}, "nq_evction", "unknown nexusquant request argument 'nq_evction'"),
    ({"nq_eviction": "balanced", "nq_protect": [0, 4]}, "nq_protect", "unknown nexusquant request argument"),
])
def test_bad_eviction_args_are_a_400_naming_the_field(server, xargs, param, message):
    _assert_400(_complete(server, vllm_xargs=xargs), param, message)


@pytest.mark.parametrize("value", [{"a": 1}, None, [[5, 2]]])
def test_values_outside_vllms_xargs_schema_are_a_400_naming_the_field(server, value):
    """``vllm_xargs`` values may only be strings, numbers or flat lists of them (vLLM's request schema): anything
    else is refused by vLLM before our validation, still naming the field."""
    field = "nq_eviction_protect" if isinstance(value, list) else "nq_eviction"
    resp = _complete(server, vllm_xargs={field: value})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == f"body.vllm_xargs.{field}", resp.text


def test_valid_protected_ranges_over_http(server):
    """vLLM's vllm_xargs schema has no nested lists, so ranges travel flat: [s0, e0, s1, e1, ...]."""
    resp = _complete(server, vllm_xargs={"nq_eviction": "balanced", "nq_eviction_protect": [0, 4, 8, 12]})
    assert resp.status_code == 200, resp.text


def test_bad_eviction_arg_in_a_chat_request(server):
    import httpx

    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "vllm_xargs": {"nq_eviction": 2}}
    _assert_400(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120), "nq_eviction",
                "nq_eviction must be in [0, 1), got 2.0")


def test_other_extra_args_and_valid_values_are_accepted(server):
    for xargs in ({"nq_eviction": "balanced"}, {"nq_eviction": 0.3, "nq_eviction_at": 8}, {"not_ours": [1, 2]}):
        resp = _complete(server, vllm_xargs=xargs)
        assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length", resp.text


def test_prompt_longer_than_max_model_len_is_a_400(server):
    _assert_400(_complete(server, prompt=[42] * (HTTP_MAX_MODEL_LEN + 1)), "input_tokens",
                f"This model's maximum context length is {HTTP_MAX_MODEL_LEN} tokens. However, your prompt contains "
                f"at least {HTTP_MAX_MODEL_LEN + 1} input tokens")


def test_max_tokens_past_max_model_len_is_clamped(server):
    """vLLM 0.32 does not refuse prompt + max_tokens > max_model_len: it stops at max_model_len."""
    resp = _complete(server, prompt=[42] * (HTTP_MAX_MODEL_LEN - 8), max_tokens=16)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 8 and resp.json()["choices"][0]["finish_reason"] == "length"


def test_empty_prompts_are_a_400(server):
    _assert_400(_complete(server, prompt=""), "prompt", "Either prompt or prompt_embeds must be provided and non-empty")
    resp = _complete(server, prompt=[])
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "You must pass at least one prompt", resp.text


def test_empty_chat_message_gets_an_answer(server):
    """The chat template wraps an empty message in role tokens, so the prompt is not empty: vLLM answers."""
    import httpx

    body = {"model": "smol", "messages": [{"role": "user", "content": ""}], "max_tokens": 4, "temperature": 0}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] > 0, resp.text


def test_server_still_serves_after_the_bad_requests(server):
    """Runs last in this module: the same server process, healthy, answering greedily."""
    import httpx

    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    resp = _complete(server, max_tokens=8)
    assert resp.status_code == 200, resp.text
    assert "Paris" in resp.json()["choices"][0]["text"]
