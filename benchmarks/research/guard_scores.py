"""A study (the laboratory, not the product): which attention signal finds the fact a question asks about, for the
fact guard of the compaction (``nexusquant_vllm.eviction.compaction.fact_guard``).

For ``benchmarks.facts`` prompts (HF float32 SmolLM2, the attention of the prompt's last 256 queries recorded by
``eviction_offline.prefill``), each candidate scores every prompt token; reported is the rank of the asked fact (its
value and the 8 tokens before it, best token) among the tokens outside the first block and the last 32 (0 = the
highest score is on the fact). Candidates, all summed over layers: ``max_wN``: the mean attention of the last N
queries, maxed over query heads; ``mean_w32``: the same, averaged over heads; ``cF_32``: the attention of the last F
queries beyond each head's 32-query window mean, clamped at 0 and maxed over heads (the product's score is
``c4_32``, ``collector.FOCUS``). Writes results/guard_scores.{json,md}.

    python -m benchmarks.research.guard_scores [--prompts 8] [--tokens 1024] [--seed 123]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import write_results

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("number", "code", "name", "multi4", "multi4-all")


def beyond(focus: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``[P]`` from ``[L, Hq, P]`` mean attentions of a few last queries and of the whole window: per layer, the most
    any head's last queries attend a token beyond its window's mean, summed over layers."""
    return (focus - window).clamp(min=0).amax(1).sum(0)


def candidates(probs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per candidate a score ``[P]`` from each layer's attention rows ``[Hq, 256, P]``."""
    mean = {w: torch.stack([p[:, -w:].mean(1) for p in probs]) for w in (1, 4, 8, 32)}  # [L, Hq, P]
    out = {f"max_w{w}": mean[w].amax(1).sum(0) for w in (1, 4, 8, 32)}
    out["mean_w32"] = mean[32].mean(1).sum(0)
    out.update({f"c{f}_32": beyond(mean[f], mean[32]) for f in (1, 4, 8)})
    return out


def fact_rank(score: torch.Tensor, fact: range) -> int:
    eligible = score.clone()
    eligible[:32] = eligible[-32:] = float("-inf")
    return int((eligible > eligible[list(fact)].max()).sum())


def main() -> None:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from benchmarks.common import smollm2_path
    from benchmarks.facts import kind_prompts
    from benchmarks.research.eviction_offline import load_model, prefill

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8, help="per kind")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = str(smollm2_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), load_model(path)
    ranks: dict[str, dict[str, list[int]]] = {}
    for kind in KINDS:
        for prompt in tqdm(kind_prompts(tokenizer, kind, args.prompts, args.tokens, args.seed), desc=kind):
            ids = tokenizer(prompt.prompt).input_ids
            with torch.inference_mode():
                scores = candidates(prefill(model, torch.tensor([ids]), len(ids)).probs)
            for answer in prompt.answers:
                value = tokenizer(" " + answer, add_special_tokens=False).input_ids
                start = next(i for i in range(len(ids)) if ids[i : i + len(value)] == value)
                fact = range(start - 8, start + len(value))
                for name, score in scores.items():
                    ranks.setdefault(kind, {}).setdefault(name, []).append(fact_rank(score, fact))
    names = list(next(iter(ranks.values())))
    lines = [f"Rank of the asked fact among the prompt's tokens per guard score ({args.prompts} prompts of "
             f"~{args.tokens} tokens per kind, seed {args.seed}; facts ranked first / median rank; "
             "`python -m benchmarks.research.guard_scores`)", "",
             "| kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for kind, per in ranks.items():
        cells = [f"{sum(r == 0 for r in per[n])}/{len(per[n])} / {sorted(per[n])[len(per[n]) // 2]}" for n in names]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    write_results("guard_scores", {"config": vars(args), "ranks": ranks}, "\n".join(lines), RESULTS)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
