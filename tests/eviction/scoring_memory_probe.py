"""Run as a script: the peak memory (MiB above the inputs) of scoring one layer of one long prompt with Llama-3-8B's
head shapes, the earlier prompt chunks read back from dense pages. Used by test_scoring_memory.py."""

import resource
import sys

import torch

from nexusquant_vllm.attention import DensePages, LayerStep
from nexusquant_vllm.eviction import WindowAttentionScorer
from nexusquant_vllm.eviction.collector import ExpectedAttentionHeads, ScoreCollector, ScoredRequest
from nexusquant_vllm.eviction.expected import FUTURE_POSITIONS, Rope

HQ, HK, D, BLOCK, NEW = 32, 8, 128, 16, 256


def main(prompt: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    blocks = prompt // BLOCK
    pages = torch.empty(blocks + 1, HK, BLOCK, 2 * D, dtype=torch.bfloat16).normal_()  # no float32 staging copy
    q = torch.empty(NEW, HQ, D, dtype=torch.bfloat16).normal_()
    k, v = torch.empty(2, NEW, HK, D, dtype=torch.bfloat16).normal_()
    angles = torch.arange(prompt + FUTURE_POSITIONS)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    collector = ScoreCollector(WindowAttentionScorer(window=32), ExpectedAttentionHeads(Rope(angles.cos(), angles.sin())))
    collector.plan_step([ScoredRequest("r", 0, prompt - NEW, prompt, list(range(1, blocks + 1)), BLOCK)])
    step = LayerStep(q, k, v, DensePages(D).reader(pages), D**-0.5, pages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    collector.observe(step)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert collector.compactions["r"][0][1].shape == (HK, prompt)
    print((after - before) / 1024)  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    main(int(sys.argv[1]))
