"""Result files of the benchmarks: JSON + markdown, each replaced in one rename. Torch-free, so that the GPU
benchmark (kernels_gpu.py, on a machine without transformers or vLLM) writes through it too."""

import json
import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(name: str, payload: dict, markdown_table: str, results_dir: Path = RESULTS_DIR
                  ) -> tuple[Path, Path]:
    """Write `<results_dir>/<name>.json` and `.md` (default `results/` beside this file), each replaced in one
    rename."""
    results_dir.mkdir(exist_ok=True)
    json_path = results_dir / f"{name}.json"
    markdown_path = results_dir / f"{name}.md"
    replace_file(json_path, json.dumps(payload, indent=2) + "\n")
    replace_file(markdown_path, markdown_table.rstrip("\n") + "\n")
    return json_path, markdown_path


def replace_file(path: Path, text: str) -> None:
    """Write through `<path>.tmp` so a reader never sees half a file."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)
