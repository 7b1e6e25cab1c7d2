"""The arithmetic of a real deployment, written to docs/scaling.md: Llama-3-70B on one node of 8 GPUs (TP=8), 128K
context, 64 concurrent users, with bf16 / fp8 / e8-k3v2 KV caches, with and without eviction.

Every number comes from the model's shape, the codec's slot layout (`nexusquant_vllm.codec.format`), vLLM's memory
split and, for the offload tier, the record/page ratio measured by `benchmarks/offload.py` on SmolLM2
(`benchmarks/results/offload.json`; the codes are near-random bytes at any model size, the scales compress alike).
Nothing in the document is typed by hand.

    python -m benchmarks.scaling [--gpu-gib 80] [--users 64] [--context 131072]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.results_io import RESULTS_DIR, replace_file
from nexusquant_vllm.codec.format import get_format

DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
GIB = 1 << 30
EVICTION_RATES = (0.0, 0.35, 0.6, 0.8)


@dataclass(frozen=True)
class Model:
    name: str = "Llama-3-70B"
    layers: int = 80
    kv_heads: int = 8
    head_dim: int = 128
    params: float = 70.6e9
    weight_bytes: int = 2  # bf16


@dataclass(frozen=True)
class Deployment:
    gpus: int = 8
    tp: int = 8
    gpu_gib: float = 80.0
    gpu_memory_utilization: float = 0.9  # vLLM's default
    activation_gib: float = 4.0  # activations, CUDA graphs, sampler: per GPU, assumed
    context: int = 131072
    users: int = 64
    block_size: int = 16


def kv_bytes_per_token_per_rank(model: Model, dep: Deployment, dtype: str, protected: int = 0,
                                protect_format: str = "bf16") -> float:
    """One token's K and V in every layer, for the KV heads one TP rank holds; ``protected`` layers store
    ``protect_format``."""
    heads = max(model.kv_heads // dep.tp, 1)  # fewer KV heads than ranks: vLLM replicates them

    def per_layer(d: str) -> float:
        dense = heads * 2 * model.head_dim * 2
        return dense if d == "bf16" else dense / 2 if d == "fp8" else heads * get_format(d, model.head_dim).slot_bytes

    return (model.layers - protected) * per_layer(dtype) + protected * per_layer(protect_format)


def kv_budget_gib(model: Model, dep: Deployment) -> float:
    weights = model.params * model.weight_bytes / dep.tp / GIB
    return dep.gpu_gib * dep.gpu_memory_utilization - weights - dep.activation_gib


def rows(model: Model, dep: Deployment) -> list[dict]:
    budget = kv_budget_gib(model, dep) * GIB
    configs = [("bf16", "bf16", 0, "bf16"), ("fp8", "fp8", 0, "bf16"),
               ("e8-k3v2, default protection (2 + 2 e8-k4v4)", "e8-k3v2", 4, "e8-k4v4"),
               ("e8-k3v2, no protection", "e8-k3v2", 0, "bf16")]
    out = []
    for label, dtype, protected, protect_format in configs:
        per_token = kv_bytes_per_token_per_rank(model, dep, dtype, protected, protect_format)
        for rate in EVICTION_RATES if dtype == "e8-k3v2" else (0.0,):
            # eviction frees whole blocks of the prompt; the context is all prompt here
            kept = math.ceil(dep.context * (1 - rate) / dep.block_size) * dep.block_size
            per_user = kept * per_token
            out.append({
                "cache": label, "eviction": rate, "bytes_per_token_per_rank": per_token,
                "gib_per_user_per_rank": per_user / GIB, "users_per_node": int(budget // per_user),
                "fits_demand": budget >= dep.users * per_user,
                "vs_bf16": kv_bytes_per_token_per_rank(model, dep, "bf16") * dep.context / per_user,
            })
    return out


def eviction_traffic(model: Model, dep: Deployment) -> dict:
    """What eviction adds per request, once, in the step that completes its prompt: in every layer the tensor-parallel
    group all-reduces one float32 per prompt token (the mean or the max over all heads; a ring all-reduce moves
    2 (tp - 1) / tp of it per rank), and the group's first rank sends the layer sums in the eviction connector's
    worker metadata, which vLLM's executor gathers to the engine core every step anyway (`KVOutputAggregator`)."""
    scores = dep.context * 4
    allreduce = 2 * (dep.tp - 1) / dep.tp * scores * model.layers
    return {"allreduce_bytes_per_rank": int(allreduce), "allreduce_ms_at_300_gb_s": allreduce / 300e9 * 1e3,
            "bytes_to_engine_core": scores, "decision_broadcast_bytes": math.ceil(dep.context / dep.block_size) * 4}


def offload_ratio() -> dict:
    """The measured record/page ratio of the offload tier (no protection, the smallest stored form), if measured."""
    path = RESULTS_DIR / "offload.json"
    if not path.exists():
        return {}
    rows_ = [r for r in json.loads(path.read_text())["bytes"] if r["protection"] == "none"]
    return {"record_over_pages": sum(r["record_bytes_per_token"] / r["page_bytes_per_token"] for r in rows_) / len(rows_)}


def disk_per_prompt(model: Model, dep: Deployment, ratio: float) -> dict:
    per_rank = kv_bytes_per_token_per_rank(model, dep, "e8-k3v2") * dep.context * ratio
    return {"gib_per_rank": per_rank / GIB, "gib_per_node": per_rank * dep.tp / GIB,
            "files_per_rank": dep.context // dep.block_size}


def markdown(model: Model, dep: Deployment, table: list[dict], traffic: dict, disk: dict, ratio: float) -> str:
    budget = kv_budget_gib(model, dep)
    lines = [
        "# Scaling out: the arithmetic of a real deployment",
        "",
        "Generated by `python -m benchmarks.scaling` (do not edit by hand; rerun it). Inputs: "
        f"{model.name} ({model.layers} layers, {model.kv_heads} KV heads of {model.head_dim}, "
        f"{model.params / 1e9:.1f}B parameters in bf16) on {dep.gpus} GPUs of {dep.gpu_gib:.0f} GiB with tensor "
        f"parallelism {dep.tp}, {dep.context:,}-token contexts, {dep.users} concurrent users, block size "
        f"{dep.block_size}. Each rank holds {max(model.kv_heads // dep.tp, 1)} KV head(s) of every layer. KV budget "
        f"per GPU: {dep.gpu_gib:.0f} GiB x {dep.gpu_memory_utilization} (vLLM's default) - "
        f"{model.params * model.weight_bytes / dep.tp / GIB:.1f} GiB of weights - {dep.activation_gib:.0f} GiB of "
        f"activations (assumed) = **{budget:.1f} GiB**.",
        "",
        "## KV memory per rank and users per node",
        "",
        "| KV cache | eviction | bytes / token / rank | GiB per 128K user per rank | users per node | "
        f"{dep.users} users fit | context per GiB vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['cache']} | {r['eviction']:.0%} | {r['bytes_per_token_per_rank']:,.0f} | "
              f"{r['gib_per_user_per_rank']:.2f} | {r['users_per_node']} | {'yes' if r['fits_demand'] else 'no'} | "
              f"{r['vs_bf16']:.1f}x |" for r in table]
    lines += [
        "",
        "e8 rows count everything stored: codes and the fp16 scales of each token-head "
        f"({get_format('e8-k3v2', model.head_dim).slot_bytes} B per token-head at head_dim {model.head_dim}), and "
        f"the protected layers in e8-k4v4 ({get_format('e8-k4v4', model.head_dim).slot_bytes} B). Eviction keeps `ceil(context x (1 - rate) / block) x block` tokens.",
        "",
        "## What eviction adds between ranks",
        "",
        "Every rank scores the prompt's tokens over its own query heads, in every layer of the step that completes "
        "the prompt; the tensor-parallel group all-reduces them (the mean over all heads at 35% eviction, the max at "
        "60% and 80%, as one rank holding every head would score), and the group's first rank sends the sum over its "
        "layers in the eviction connector's worker metadata, which vLLM's executor already gathers from every rank "
        "each step (`KVOutputAggregator`); the connector adds the pipeline stages' sums "
        "(`EvictionWorkerMetadata.aggregate`). So the decision is taken once, on the engine core, from the scores "
        "one rank would compute over all heads and layers, and reaches every rank in the next step's scheduler output "
        "(the same block list for all). Per request, once, after its prefill:",
        "",
        "| traffic | bytes |",
        "|---|---|",
        f"| all-reduce of the scores over the TP group, {model.layers} layers, per rank | "
        f"{traffic['allreduce_bytes_per_rank']:,} (~{traffic['allreduce_ms_at_300_gb_s']:.2f} ms at 300 GB/s) |",
        f"| scores sent to the engine core (float32 per prompt token, one rank) | {traffic['bytes_to_engine_core']:,} |",
        f"| decision sent to every rank (int32 per freed block, at most) | {traffic['decision_broadcast_bytes']:,} |",
        "",
        "The all-reduce is one collective per layer in that step, beside the layer's own; the rest rides on messages "
        "vLLM sends every step anyway. "
        "Compaction (per layer, per KV head) stays local to each rank.",
        "",
        "## The offload tier's directory on several nodes",
        "",
        f"A {dep.context:,}-token prompt is stored as {disk['files_per_rank']:,} records per rank "
        f"({disk['gib_per_rank']:.2f} GiB per rank, {disk['gib_per_node']:.2f} GiB per node of {dep.tp} ranks, at the "
        f"measured record/page ratio {ratio:.3f} of e8-k3v2 without protection). Records are keyed by vLLM's block "
        "hash (sha256, identical in every process) under one namespace per tensor x pipeline rank, so rank r of "
        "every node reads and writes the same folder and a record written by one node is a hit on every other. A "
        "record is written to a temporary file and renamed, which is atomic on a local file system and on NFS "
        "(rename within a directory is one server operation); a reader sees a whole record or none, and a damaged "
        "one is recomputed, never loaded. The byte budget (`disk_gb`) is enforced by every process from its own "
        "running estimate plus a directory scan, so with N writers the directory may exceed it by the records "
        "written between two scans; size the budget with that slack. Two nodes computing the same block write the "
        "same key: the later rename wins, and both records are valid (they can differ in the last bits when the "
        "nodes chunked the prefill differently).",
        "",
        "## Launching across nodes (vLLM's Ray backend; nothing home-made)",
        "",
        "Install this package (and vLLM) on every node: vLLM loads plugins from the `vllm.general_plugins` entry "
        "point in every process it starts, Ray workers included.",
        "",
        "```bash",
        "# node 0",
        "ray start --head --port 6379",
        "# every other node",
        "ray start --address <node-0-ip>:6379",
        "# node 0: one model over 2 nodes x 8 GPUs",
        "vllm serve meta-llama/Llama-3.3-70B-Instruct --distributed-executor-backend ray \\",
        "  --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 131072 \\",
        "  --kv-cache-dtype e8-k3v2 --block-size 32 \\",
        "  --kv-transfer-config '{\"kv_connector\":\"MultiConnector\",\"kv_role\":\"kv_both\",'"
        "'\"kv_load_failure_policy\":\"recompute\",\"kv_connector_extra_config\":{\"connectors\":['",
        "'{\"kv_connector\":\"NQEvictionConnector\",\"kv_role\":\"kv_both\",\"kv_connector_extra_config\":"
        "{\"eviction\":\"conservative\"}},'",
        "'{\"kv_connector\":\"NQOffloadConnector\",\"kv_role\":\"kv_both\",\"kv_load_failure_policy\":\"recompute\",'"
        "'\"kv_connector_extra_config\":{\"ram_gb\":64,\"disk_dir\":\"/shared/nexusquant\",\"disk_gb\":2048}}]}}'",
        "```",
        "",
        "With one node per model replica instead (data parallelism), start one `vllm serve ... --tensor-parallel-size "
        "8` per node behind a load balancer; the replicas share the offload directory and so each other's prefixes.",
        "",
        *measured_section(),
    ]
    return "\n".join(lines) + "\n"


def measured_section() -> list[str]:
    """What `benchmarks/parallel.py` measured with two ranks on vLLM's CPU build, if it ran."""
    from benchmarks.parallel import table

    path = RESULTS_DIR / "parallel.json"
    if not path.exists():
        return ["## Measured with two ranks", "", "Not measured yet: run `python -m benchmarks.parallel`."]
    results = json.loads(path.read_text())
    return [
        "## Measured with two ranks (vLLM's CPU build)",
        "",
        f"`python -m benchmarks.parallel --chunks {results['chunks']} --seed {results['seed']}` serves SmolLM2-135M "
        "with its KV heads duplicated (the same function, 6 KV heads: TP=2 gives each rank 3) at TP=1, TP=2 and "
        "PP=2, each corpus chunk once without and once with 35% eviction decided at the end of an 832-token prompt, "
        "and compares every configuration with TP=1 of the same KV-cache dtype, and e8 at TP=1 with `auto` at TP=1 "
        "(the codec's own effect) (`benchmarks/results/parallel.md`; see the script's docstring for the columns).",
        "",
        table(results),
        "",
        _reading(results["comparisons"]),
    ]


def _reading(c: dict) -> str:
    """The table in words, its numbers read from the results."""
    tp, pp, auto, codec = c["e8-k3v2-tp2"], c["e8-k3v2-pp2"], c["auto-tp2"], c["e8-k3v2-tp1"]
    return (
        f"Every rank applied the engine's one decision: TP=2 {tp['every_rank_applied_the_decision']}, PP=2 "
        f"{pp['every_rank_applied_the_decision']}. It freed the same blocks as one rank for TP=2 in "
        f"{tp['same_blocks_freed']} and for PP=2 in {pp['same_blocks_freed']} of "
        f"{len(tp['plain']['greedy_common_prefix'])} prompts. Position by position, e8 at "
        f"TP=2 picks TP=1's top token as often as `auto` does ({tp['plain']['top1_agreement']:.3f} vs "
        f"{auto['plain']['top1_agreement']:.3f}), but its greedy text parts sooner: a key or value that TP's "
        "different summation order rounds differently in bf16 can land on another E8 codeword, so the two runs' "
        "decode steps read slightly different caches (still closer than e8 and `auto` at TP=1, common prefixes "
        f"{tp['plain']['greedy_common_prefix']} vs {codec['plain']['greedy_common_prefix']}). PP splits layers, not "
        f"sums: without eviction its mean |Δ log-probability| to TP=1 is {pp['plain']['mean_abs_dlogprob']:.4f}. "
        "With eviction, PP's continuation differs because the engine "
        "keeps one batch per stage in flight, so the continuation's first chunk is computed before the decision "
        "arrives (over the whole cache)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--context", type=int, default=131072)
    args = parser.parse_args(argv)
    model, dep = Model(), Deployment(gpu_gib=args.gpu_gib, users=args.users, context=args.context)
    table, traffic = rows(model, dep), eviction_traffic(model, dep)
    ratio = offload_ratio().get("record_over_pages", 1.0)
    disk = disk_per_prompt(model, dep, ratio)
    text = markdown(model, dep, table, traffic, disk, ratio)
    payload = {"model": asdict(model), "deployment": asdict(dep), "rows": table, "eviction_traffic": traffic,
               "offload_record_over_pages": ratio, "disk_per_prompt": disk}
    replace_file(RESULTS_DIR / "scaling.json", json.dumps(payload, indent=2) + "\n")
    replace_file(DOC, text)
    print(text)


if __name__ == "__main__":
    main()
