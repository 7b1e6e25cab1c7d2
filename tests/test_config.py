"""The plugin's configuration: environment parsing, additional_config overrides, clear errors."""

import pytest

from nexusquant_vllm.config import NexusQuantConfig


def test_defaults_and_environment():
    assert NexusQuantConfig.from_env({}) == NexusQuantConfig("auto", "auto", "e8-k4v4", "", False)
    config = NexusQuantConfig.from_env({"NEXUSQUANT_ATTENTION": "torch", "NEXUSQUANT_PROTECT_LAYERS": "none",
                                        "NEXUSQUANT_PROTECT_FORMAT": "e8-k4v4", "NEXUSQUANT_EVICTION": "balanced",
                                        "NEXUSQUANT_BENCH_SCALAR": "1"})
    assert config == NexusQuantConfig("torch", "none", "e8-k4v4", "balanced", True)
    assert not NexusQuantConfig.from_env({"NEXUSQUANT_BENCH_SCALAR": "0"}).bench_scalar


@pytest.mark.parametrize("env,message", [
    ({"NEXUSQUANT_ATTENTION": "fastest"}, "attention='fastest': expected one of auto, torch, native, triton"),
    ({"NEXUSQUANT_PROTECT_LAYERS": "first-two"}, "NEXUSQUANT_PROTECT_LAYERS='first-two'"),
    ({"NEXUSQUANT_EVICTION": "everything"}, "NEXUSQUANT_EVICTION"),
    ({"NEXUSQUANT_PROTECT_FORMAT": "fp8"}, "NEXUSQUANT_PROTECT_FORMAT='fp8': expected 'auto' \\(the model dtype\\) or one "
                                           "of e8-"),
])
def test_a_bad_environment_value_names_its_variable(env, message):
    with pytest.raises(ValueError, match=message):
        NexusQuantConfig.from_env(env)


def test_additional_config_overrides_the_environment():
    env = NexusQuantConfig.from_env({"NEXUSQUANT_ATTENTION": "torch", "NEXUSQUANT_PROTECT_LAYERS": "3"})
    merged = env.merged({"protect_layers": 15, "eviction": 0.35})
    assert merged == NexusQuantConfig("torch", "15", "e8-k4v4", "0.35", False)
    assert merged.merged(merged.to_dict()) == merged  # what the workers read back from vLLM's config
    with pytest.raises(ValueError, match="unknown additional_config.nexusquant keys \\['atention'\\]"):
        env.merged({"atention": "torch"})
    with pytest.raises(ValueError, match="bench_scalar must be true or false"):
        env.merged({"bench_scalar": "yes"})


def test_resolved_once_into_additional_config_for_every_worker(monkeypatch):
    from types import SimpleNamespace

    from nexusquant_vllm.vllm_glue.startup import before_engine_config, run_config

    monkeypatch.setenv("NEXUSQUANT_PROTECT_LAYERS", "none")
    args = SimpleNamespace(kv_cache_dtype="e8-k3v2", kv_transfer_config=None,
                           additional_config={"nexusquant": {"attention": "torch"}, "other_plugin": 1})
    before_engine_config(args)
    assert args.additional_config["nexusquant"] == NexusQuantConfig("torch", "none", eviction="").to_dict()
    assert args.additional_config["other_plugin"] == 1
    monkeypatch.setenv("NEXUSQUANT_PROTECT_LAYERS", "4")  # a worker reads vLLM's config, not its environment
    assert run_config(SimpleNamespace(additional_config=args.additional_config)).protect_layers == "none"
    with pytest.raises(ValueError, match="unknown additional_config.nexusquant keys"):
        before_engine_config(SimpleNamespace(kv_cache_dtype="e8-k3v2", kv_transfer_config=None,
                                             additional_config={"nexusquant": {"protect": 3}}))
