"""Eviction scoring runs after vLLM's memory profiling, so what it allocates must not grow with the prompt: one layer
of a 32K-token prompt with Llama-3-8B's head shapes (32 query heads, 8 KV heads, head_dim 128) may take at most
400 MiB above its inputs. Scoring that held query heads x prompt x head_dim buffers took 1835 MiB here (measured
with the collector of ba57be9: 489 / 926 / 1835 MiB at 8K / 16K / 32K tokens, about 56 KiB per token)."""

import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("scoring_memory_probe.py")


def test_scoring_memory_is_bounded_by_the_chunk_not_the_prompt():
    out = subprocess.run([sys.executable, str(PROBE), "32768"], capture_output=True, text=True, timeout=300,
                         check=True)
    peak_mib = float(out.stdout.strip().splitlines()[-1])
    assert peak_mib < 400, f"scoring a 32K-token prompt took {peak_mib:.0f} MiB above its inputs"
