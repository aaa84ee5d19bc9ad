"""Perplexity on held-out text for each quantization mode of one checkpoint.

    python bench/quality.py --model models/trained-tiny [--chunks 40] [--out results/quality.json]

Train the model first with bench/train_tiny.py (random weights have nothing to
lose). Held-out text is the stdlib files train_tiny.py never trained on.

Perplexity comes from the engine's own prompt log-probabilities. Prefill is
forced into small chunks (max_num_batched_tokens = --chunk-tokens): a fresh
prefill attends over its new keys straight from the projection, so only tokens
that read earlier keys back from the cache see the KV cache's quantization;
small chunks make almost all of them do so, as in decode.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, write_json  # noqa: E402
from train_tiny import split_corpus  # noqa: E402

from colocate import LLM, SamplingParams  # noqa: E402

MODES = [
    # (label, LLM keyword arguments)
    ("float32", {}),
    ("int8 weights", {"quantization": "int8"}),
    ("int4 g128 weights", {"quantization": "int4", "quant_group_size": 128}),
    ("int4 g32 weights", {"quantization": "int4", "quant_group_size": 32}),
    ("int8 KV", {"kv_cache_dtype": "int8"}),
    ("int4 g128 + int8 KV", {"quantization": "int4", "quant_group_size": 128,
                             "kv_cache_dtype": "int8"}),
]


def held_out_chunks(tokenizer, num_chunks: int, chunk_len: int) -> list[list[int]]:
    """Consecutive windows of held-out token ids, each starting with BOS."""
    _, held = split_corpus()
    ids = [i for text in held for i in tokenizer.encode(text, add_special_tokens=False)]
    bos = tokenizer.bos_token_id
    step = max(chunk_len, (len(ids) - chunk_len) // max(1, num_chunks))
    return [[bos] + ids[s:s + chunk_len - 1] for s in range(0, len(ids) - chunk_len, step)][:num_chunks]


def perplexity(llm: LLM, chunks: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True)
    total, count = 0.0, 0
    for out in llm.generate(chunks, params):
        lps = out.prompt_logprobs[1:]                   # the first token has no prefix
        total += sum(lps)
        count += len(lps)
    return math.exp(-total / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=16,
                    help="max_num_batched_tokens: the prefill chunk size")
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args(argv)

    rows, results, base = [], [], None
    chunks = None
    for label, kwargs in MODES:
        t0 = time.perf_counter()
        try:
            llm = LLM(args.model, max_num_batched_tokens=args.chunk_tokens,
                      enable_prefix_caching=False, **kwargs)
        except (ValueError, NotImplementedError) as e:
            rows.append([label, "-", "-", f"unavailable: {e}"])
            results.append({"mode": label, "error": str(e)})
            continue
        if chunks is None:
            chunks = held_out_chunks(llm.tokenizer, args.chunks, args.chunk_len)
        ppl = perplexity(llm, chunks)
        base = ppl if base is None else base
        delta = 100.0 * (ppl / base - 1.0)
        rows.append([label, f"{ppl:.3f}", f"{delta:+.2f}%", f"{time.perf_counter() - t0:.0f} s"])
        results.append({"mode": label, "settings": kwargs, "perplexity": ppl,
                        "delta_vs_float32_percent": delta})
        del llm
    print(format_table(["mode", "perplexity", "vs float32", "time"], rows))
    n_tokens = sum(len(c) - 1 for c in chunks or [])
    print(f"held-out tokens scored: {n_tokens:,} ({args.chunks} chunks of {args.chunk_len})")
    write_json(args.out, {"machine": machine_info(), "model": args.model,
                          "held_out_tokens": n_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
