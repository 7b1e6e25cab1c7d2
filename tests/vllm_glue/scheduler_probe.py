"""Run by test_preemption_abort.py in a subprocess: an in-process engine (so the scheduler's block pool is visible)
with a tiny KV pool, forcing preemption, then aborts. Prints one JSON line of measurements.

    python scheduler_probe.py MODEL KV_CACHE_DTYPE
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from preemption import counting_preemptions  # noqa: E402 - sibling module; the script runs from this folder

NUM_BLOCKS = 8  # x 16 tokens: far less than 5 requests x ~45 tokens need at once
NUM_REQUESTS, NEW_TOKENS = 5, 24
PROMPT = "Write a long story about a dragon who learns to bake bread in a small village. "


def main(model: str, kv_cache_dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, kv_cache_dtype=kv_cache_dtype, max_model_len=64, enforce_eager=True, seed=0,
        block_size=16, num_gpu_blocks_override=NUM_BLOCKS, max_num_seqs=NUM_REQUESTS, enable_prefix_caching=True,
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    with counting_preemptions(scheduler) as preemptions:
        free_start = pool.get_num_free_blocks()
        t0 = time.time()

        # 1. preemption: requests that cannot all fit at once; all must finish with their full length.
        prompts = [f"{i}. {PROMPT}" for i in range(NUM_REQUESTS)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text[:80] for o in outs]
        free_after_preempt = pool.get_num_free_blocks()
        t1 = time.time()

        # 2. aborts: start requests, run a few steps, abort two mid-flight, let the rest finish.
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        ids = [f"abort-{i}" for i in range(4)]
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, sp)
        for _ in range(3):
            engine.step()
        free_mid = pool.get_num_free_blocks()
        engine.abort_request(ids[:2])
        finished = set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished.add(out.request_id)
        free_after_abort = pool.get_num_free_blocks()
    return {
        "free_start": free_start, "free_after_preempt": free_after_preempt, "free_mid_abort": free_mid,
        "free_after_abort": free_after_abort, "num_preemptions": len(preemptions), "lengths": lengths,
        "expected_length": NEW_TOKENS, "preempt_phase_s": round(t1 - t0, 1), "abort_phase_s": round(time.time() - t1, 1),
        "finished_after_abort": sorted(finished), "texts": texts,
    }


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    print("PROBE_RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip a slow in-process engine teardown
