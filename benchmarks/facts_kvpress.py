"""External baseline for benchmarks/needle.py: do NVIDIA kvpress's presses keep split facts whole?

The same fact prompts as ``python -m benchmarks.needle`` (``benchmarks.facts``: 7-digit numbers that SmolLM2 splits
into one token per digit, codes, names, several numbers per haystack; the same texts and values for the same seed
and ``--kinds`` list, since each kind's seed offset follows its place in that list) in HF transformers (float32,
CPU, sdpa; the vLLM runs serve the model in bf16). Each prompt is prefilled whole inside ``press(model)``, which compresses every
layer's cache to (1 - rate) of its tokens, chosen per head (kvpress's own granularity), after that layer has
attended over the whole prompt: the first answer token sees the full prompt, as it does when nexusquant evicts right
after prefill, and the question is part of what the press scores. The answer is then decoded greedily over the
compressed cache with its true positions (16 tokens, 48 for ``multiN-all``) and counted as in the vLLM benchmark
(``FactPrompt.found``: the whole value, exact). Rate 0 runs without a press and is each press's reference.

Runs in the kvpress venv (see ``benchmarks/eviction_kvpress.py`` for its setup):

    PYTHONPATH=. /work/kvpress-venv/bin/python -m benchmarks.facts_kvpress [--lengths 1024,2048] [--prompts 18] \
        [--kinds number,code,name,multi4] [--rates 0.35,0.6] [--seed 1] [--name facts_kvpress]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.eviction_kvpress import PRESSES, make_press
from benchmarks.needle import answer_tokens, build_prompts, plot, rows_for


def greedy_answer(model, tokenizer, prompt: str, press, max_new: int) -> str:
    """The greedy continuation of ``prompt`` (at most ``max_new`` tokens), its prefill compressed by ``press``."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = DynamicCache()
    answer: list[int] = []
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            logits = model(ids, past_key_values=cache).logits[0, -1]
        for position in range(ids.shape[1], ids.shape[1] + max_new):
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            answer.append(token)
            logits = model(torch.tensor([[token]]), past_key_values=cache,
                           position_ids=torch.tensor([[position]])).logits[0, -1]
    return tokenizer.decode(answer, skip_special_tokens=True)


def found_at(model, tokenizer, press: str | None, rate: float, prompts: dict, progress) -> dict[str, list[int]]:
    """Facts found per prompt, keyed ``rate|kind|length`` as in ``benchmarks.needle`` (``press`` None: rate 0)."""
    found = {}
    for (kind, length), trials in prompts.items():
        progress.set_postfix(press=press, rate=rate, kind=kind, tokens=length)
        found[f"{rate}|{kind}|{length}"] = hits = []
        for trial in trials:
            text = greedy_answer(model, tokenizer, trial.prompt, press and make_press(press, rate), answer_tokens(kind))
            hits.append(trial.found(text))
            progress.update()
    return found


def main() -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import RESULTS_DIR, smollm2_path, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048", help="prompt tokens")
    p.add_argument("--prompts", type=int, default=18, help="per kind and length")
    p.add_argument("--kinds", default="number,code,name,multi4", help="number, code, name, multiN, multiN-all")
    p.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=[0.35, 0.6])
    p.add_argument("--presses", type=lambda s: s.split(","), default=list(PRESSES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--name", default="facts_kvpress")
    args = p.parse_args()
    unknown = set(args.presses) - set(PRESSES)
    if unknown or "passkey" in args.kinds.split(",") or not all(0 < r < 1 for r in args.rates):
        raise SystemExit(f"presses must be among {list(PRESSES)}, kinds among benchmarks.facts' kinds, rates in (0, 1)")

    torch.set_num_threads(1)  # the machine is shared with the vLLM runs
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = build_prompts(tokenizer, args.kinds.split(","), [int(x) for x in args.lengths.split(",")],
                            args.prompts, args.seed)
    per_rate = sum(len(t) for t in prompts.values())
    runs = {}
    with tqdm(total=per_rate * (1 + len(args.presses) * len(args.rates)), desc="kvpress facts", unit="prompt") as bar:
        reference = found_at(model, tokenizer, None, 0.0, prompts, bar)
        for name in args.presses:
            t0 = time.time()
            found = dict(reference)
            for rate in args.rates:
                found |= found_at(model, tokenizer, name, rate, prompts, bar)
            runs[name] = {"found": found, "evicted": {k: float(k.split("|")[0]) for k in found}, "capacity": None,
                          "wall_s": time.time() - t0}
    rows = rows_for(args.presses, runs, prompts)
    table = ["| press | rate | kind | prompt tokens | recall | no press | lost / gained vs no press |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['config']} | {r['rate']:.0%} | {r['kind']} | {r['prompt_tokens']} | {r['recall']:.3f} "
              f"({r['found']}/{r['facts']}) | {r['reference_recall']:.3f} | {r['lost']} / {r['gained']} |"
              for r in rows]
    payload = {"model": "SmolLM2-135M-Instruct", "model_dtype": "float32", "seed": args.seed, "rows": rows,
               "wall_s": {name: run["wall_s"] for name, run in runs.items()}}
    write_results(args.name, payload, "\n".join(table))
    plot(rows, RESULTS_DIR / f"{args.name}.png", across="rate",
         title="kvpress on SmolLM2-135M (HF transformers, float32, CPU): facts recalled per press and rate")
    print("\n".join(table))


if __name__ == "__main__":
    main()
