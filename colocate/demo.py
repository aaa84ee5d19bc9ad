"""`colocate demo`: offline generation over a batch of prompts, with tokens/s."""
from __future__ import annotations

import time

DEMO_PROMPTS = [
    "The three services on this device share one copy of the weights",
    "Continuous batching lets a new request join",
    "A paged KV cache stores keys and values in fixed blocks",
    "Hello",
    "The memory arbiter admits a service only if",
    "Once upon a time",
    "Quantized weights",
    "Prometheus scrapes",
]


def run_demo(model_dir: str, num_prompts: int = 8, max_tokens: int = 64) -> int:
    from colocate.llm import LLM
    from colocate.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype="float32")
    load_s = time.perf_counter() - t0
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n    -> {out.text!r}  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"\nloaded in {load_s:.1f} s; {len(prompts)} prompts, {generated} tokens "
          f"in {elapsed:.2f} s = {generated / elapsed:.1f} tokens/s (batched, CPU)")
    return 0
