"""Perplexity on held-out text for each quantization mode of one checkpoint.

    python bench/quality.py --model FILE.gguf | DIR [--text FILE | --text stdlib]
                            [--chunks 40] [--out results/quality.json]

Any checkpoint: a GGUF (the built-in SmolLM2, `--model preset:smollm2-135m-instruct`)
or an HF directory (for example bench/train_tiny.py's trained model). The held-out text
defaults to /usr/share/common-licenses/GPL-3, English every Debian machine has and no
small model was tuned on; `--text stdlib` uses the stdlib files train_tiny.py held out.

Modes: for a GGUF, the weights as stored (its Q4_1 / Q8_0 blocks, exactly), dequantized
to float32 (the baseline), requantized to int8 / int4 g32 / int4 g64, the int8 KV cache,
and as stored + int8 KV; for an HF checkpoint, float32 (the baseline), int8, int4 g128
and g32, int8 KV, int4 g128 + int8 KV. A mode a model cannot take is reported with the
reason and the rest still run.

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

from colocate import LLM, SamplingParams  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
PRESET = "preset:"

GGUF_MODES = [
    # (label, LLM keyword arguments); the first is the baseline
    ("dequantized float32", {"quantization": "none"}),
    ("as stored (GGUF blocks)", {}),
    ("int8 requantized", {"quantization": "int8"}),
    ("int4 g32 requantized", {"quantization": "int4", "quant_group_size": 32}),
    ("int4 g64 requantized", {"quantization": "int4", "quant_group_size": 64}),
    ("int8 KV", {"quantization": "none", "kv_cache_dtype": "int8"}),
    ("as stored + int8 KV", {"kv_cache_dtype": "int8"}),
]
HF_MODES = [
    ("float32", {}),
    ("int8 weights", {"quantization": "int8"}),
    ("int4 g128 weights", {"quantization": "int4", "quant_group_size": 128}),
    ("int4 g32 weights", {"quantization": "int4", "quant_group_size": 32}),
    ("int8 KV", {"kv_cache_dtype": "int8"}),
    ("int4 g128 + int8 KV", {"quantization": "int4", "quant_group_size": 128,
                             "kv_cache_dtype": "int8"}),
]


def resolve_model(model: str) -> str:
    """A path, or `preset:NAME` of a published checkpoint (the installed GGUF)."""
    if model.startswith(PRESET):
        from colocate.model.published import published_path

        return str(published_path(model[len(PRESET):]))
    return model


def held_out_texts(text: str) -> list[str]:
    if text == "stdlib":
        from train_tiny import split_corpus

        return split_corpus()[1]
    return [Path(text).read_text(encoding="utf-8", errors="replace")]


def held_out_chunks(tokenizer, texts: list[str], num_chunks: int,
                    chunk_len: int) -> list[list[int]]:
    """Consecutive windows of held-out token ids, each starting as the tokenizer starts
    a text (with BOS if it adds one; the first token is never scored)."""
    ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]
    prefix = tokenizer.encode("a")[:-len(tokenizer.encode("a", add_special_tokens=False))]
    body = chunk_len - len(prefix)
    step = max(body, (len(ids) - body) // max(1, num_chunks))
    return [prefix + ids[s:s + body] for s in range(0, len(ids) - body, step)][:num_chunks]


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
    ap.add_argument("--text", default=DEFAULT_TEXT, help="held-out text file, or 'stdlib'")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=16,
                    help="max_num_batched_tokens: the prefill chunk size")
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args(argv)

    model = resolve_model(args.model)
    modes = GGUF_MODES if model.lower().endswith(".gguf") else HF_MODES
    texts = held_out_texts(args.text)
    rows, results, base, chunks = [], [], None, None
    for label, kwargs in modes:
        t0 = time.perf_counter()
        try:
            llm = LLM(model, max_num_batched_tokens=args.chunk_tokens,
                      enable_prefix_caching=False, **kwargs)
        except (ValueError, NotImplementedError) as e:
            rows.append([label, "-", "-", f"unavailable: {e}"])
            results.append({"mode": label, "settings": kwargs, "error": str(e)})
            continue
        if chunks is None:
            chunks = held_out_chunks(llm.tokenizer, texts, args.chunks, args.chunk_len)
        ppl = perplexity(llm, chunks)
        base = ppl if base is None else base
        delta = 100.0 * (ppl / base - 1.0)
        rows.append([label, f"{ppl:.3f}", f"{delta:+.2f}%", f"{time.perf_counter() - t0:.0f} s"])
        print("  " + " | ".join(rows[-1]), flush=True)       # progress: a run takes minutes
        results.append({"mode": label, "settings": kwargs, "perplexity": ppl,
                        "delta_vs_baseline_percent": delta})
        del llm
    print(format_table(["mode", "perplexity", f"vs {modes[0][0]}", "time"], rows))
    n_tokens = sum(len(c) - 1 for c in chunks or [])
    print(f"held-out tokens scored: {n_tokens:,} ({len(chunks or [])} chunks of "
          f"{args.chunk_len}) from {args.text}")
    write_json(args.out, {"machine": machine_info(), "model": model, "text": args.text,
                          "held_out_tokens": n_tokens, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
