import subprocess
import sys

from nexusquant_vllm.cli import COMMANDS, build_parser


def test_model_command_prints_the_model_folder(smollm2_path: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nexusquant_vllm", "model"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == smollm2_path


def test_every_command_gets_a_sub_parser() -> None:
    for name in COMMANDS:
        assert build_parser().parse_args([name]).command == name
