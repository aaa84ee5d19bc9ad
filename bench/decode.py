"""Decode benchmark: colocate's precision and quantization modes against HF transformers
`generate`, on one checkpoint, in one run.

    python bench/decode.py --model DIR | FILE.gguf [--modes colocate-fp32,hf-fp32,...]
                           [--batches 1,8] [--out results/decode.json] [--threads N] [--quick]

`--model preset:smollm2-135m-instruct` is the installed SmolLM2 GGUF. On a GGUF the float
modes dequantize it, colocate-stored keeps its blocks as stored, and HF loads it with
`gguf_file=`. A mode that cannot apply to a model (int4 g128 on a 576-wide layer, the
stored mode of a float checkpoint) is reported as skipped, with the reason, and the
other modes still run.

Every mode (see MODES) is loaded in one process and the modes take turns call by call.
Per mode it measures:
  - time to first token (TTFT) for a few prompt lengths: the wall time of one call
    that generates a single token, which is prefill + one sample + the API's own cost;
  - decode tokens/s at a few batch sizes, prefill excluded (see common.decode_rate);
  - the weight bytes the model holds and the bytes a decode step reads (quantized
    integers and scales, one embedding row, the full lm_head), and from those and a
    read bandwidth measured in this run the memory-bandwidth floor: the tokens/s a
    step that did nothing but read its weights once would reach.
Prints a table and writes JSON. Asserts nothing about speed: the machine is shared.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))    # run as a script, not a package
from common import (decode_rate, format_table, machine_info,  # noqa: E402
                    measure_read_bandwidth, summarize, time_call, write_json)
from decode_engines import ENGINES  # noqa: E402


@dataclass(frozen=True)
class Mode:
    name: str
    engine: str                        # "colocate", "hf" or "llamacpp" (decode_engines.py)
    dtype: str                         # the model dtype: activations, norms, embeddings
    quantization: str | None = "none"  # colocate only: "none" (float), None (as stored),
    #                                     "int8" or "int4"
    quant_group_size: int | None = None
    kv_cache_dtype: str = "auto"       # colocate only: "auto" (the model dtype) or "int8"


# Quantized modes keep a float32 model (their linears run on bf16 inside the op anyway).
MODES = {m.name: m for m in (
    Mode("colocate-fp32", "colocate", "float32"),
    Mode("colocate-bf16", "colocate", "bfloat16"),
    Mode("colocate-int8", "colocate", "float32", quantization="int8"),
    Mode("colocate-int4", "colocate", "float32", quantization="int4", quant_group_size=128),
    Mode("colocate-kv8", "colocate", "float32", kv_cache_dtype="int8"),
    Mode("colocate-stored", "colocate", "float32", quantization=None),
    Mode("hf-fp32", "hf", "float32"),
    Mode("hf-bf16", "hf", "bfloat16"),
    # llama.cpp on the GGUF as stored (its own types: Q4_1 linears, Q8_0 embedding).
    Mode("llamacpp", "llamacpp", "gguf", quantization=None),
)}
# --quick skips the bf16 modes (the same code paths in another dtype) but keeps every
# quantized one, so a test runs each quantized path end to end.
QUICK_MODES = ("colocate-fp32", "colocate-int8", "colocate-int4", "colocate-kv8", "hf-fp32")


@dataclass(frozen=True)
class Settings:
    ttft_prompt_lens: tuple[int, ...] = (128, 512)
    ttft_repeats: int = 5
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_prompt_len: int = 32
    decode_new_tokens: int = 64
    decode_repeats: int = 3
    bandwidth_bytes: int = 256 * 2**20
    seed: int = 0

    @property
    def max_batch(self) -> int:
        return max(self.decode_batches)


# Small enough for a test to run every quick mode on the tiny preset in seconds.
QUICK = Settings(ttft_prompt_lens=(16, 64), ttft_repeats=2, decode_batches=(1, 4),
                 decode_prompt_len=8, decode_new_tokens=8, decode_repeats=1,
                 bandwidth_bytes=64 * 2**20)


def make_prompts(settings: Settings, vocab: int, tag: int, count: int, length: int
                 ) -> list[list[int]]:
    """Seeded random token ids, so lengths are exact and every mode gets the same
    prompts. `tag` tells apart the calls of a run: every timed call gets prompts of its
    own, so no engine can answer from a cache of an earlier call. Ids 0-2 are the
    tiny checkpoints' special tokens; leave them out."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + tag)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


# ---- measuring -------------------------------------------------------------------

def measure(engines: list, settings: Settings) -> tuple[dict, dict[str, list[int]]]:
    """TTFT and decode results per mode, and each mode's batch-1 greedy tokens (for a
    cross-check). The modes take turns call by call on the same prompts, rather than
    one running after the other: the load other processes put on this shared machine
    drifts over minutes, and taking turns spreads that drift over all of them."""
    vocab = min(e.vocab_size for e in engines)
    results = {e.name: {"config": e.info, "ttft_s": {}, "decode": {}} for e in engines}

    for length in settings.ttft_prompt_lens:
        samples: dict[str, list[float]] = {e.name: [] for e in engines}
        for i in range(1 + settings.ttft_repeats):          # call 0 is the warm-up
            prompt = make_prompts(settings, vocab, tag=length * 1000 + i, count=1,
                                  length=length)[0]
            for e in engines:
                seconds = time_call(lambda: e.ttft(prompt))[1]
                if i:
                    samples[e.name].append(seconds)
        for e in engines:
            results[e.name]["ttft_s"][str(length)] = summarize(samples[e.name])
        _progress(results, f"TTFT prompt {length} (ms)",
                  lambda r: r["ttft_s"][str(length)]["median"] * 1e3)

    greedy: dict[str, list[int]] = {}
    n, plen = settings.decode_new_tokens, settings.decode_prompt_len
    for batch in settings.decode_batches:
        able = [e for e in engines if batch <= e.max_batch]    # llama.cpp: batch 1 only
        runs: dict[str, list[dict]] = {e.name: [] for e in able}
        warm = make_prompts(settings, vocab, tag=-batch, count=batch, length=plen)
        for e in able:
            # A short untimed run at this batch size pays first-call costs of its shapes.
            e.decode(warm, 4)
        for r in range(settings.decode_repeats):
            prompts = make_prompts(settings, vocab, tag=10**8 + batch * 100 + r,
                                   count=batch, length=plen)
            for e in able:
                start, events, tokens = e.decode(prompts, n)
                if any(len(t) != n for t in tokens):
                    raise RuntimeError(f"{e.name} returned {[len(t) for t in tokens]} "
                                       f"tokens, expected {n} each")
                runs[e.name].append(decode_rate(start, events, batch))
                if batch == 1 and r == 0:
                    greedy[e.name] = tokens[0]
        for e in able:
            rates = [run["tokens_per_s"] for run in runs[e.name]]
            results[e.name]["decode"][str(batch)] = {
                "batch": batch, "prompt_len": plen, "new_tokens": n,
                "tokens_per_s": statistics.median(rates), "samples_tokens_per_s": rates,
                # Under contention from other processes the best run is the closest
                # to what the engine can do; the median is what a user would see.
                "best_tokens_per_s": max(rates),
                "end_to_end_tokens_per_s": statistics.median(
                    run["end_to_end_tokens_per_s"] for run in runs[e.name])}
        _progress({k: v for k, v in results.items() if str(batch) in v["decode"]},
                  f"decode batch {batch} (tok/s)",
                  lambda r: r["decode"][str(batch)]["tokens_per_s"])
    return results, greedy


def _progress(results: dict, what: str, value) -> None:
    print(f"  {what}: " + ", ".join(f"{name} {value(r):.1f}" for name, r in results.items()),
          flush=True)


def _reference(mode: Mode, names: list[str]) -> str | None:
    """A mode's greedy tokens are compared with HF's in its dtype, else HF fp32's, else
    colocate fp32's."""
    wanted = [n for n in names if MODES[n].engine == "hf" and MODES[n].dtype == mode.dtype]
    wanted += ["hf-fp32", "colocate-fp32"]
    return next((n for n in wanted if n in names and n != mode.name), None)


def run(model_dir: str, modes: list[Mode], settings: Settings) -> dict:
    report: dict = {"benchmark": "decode", "machine": machine_info(),
                    "model": {"dir": str(model_dir)}, "settings": asdict(settings),
                    "modes": [asdict(m) for m in modes]}
    # Bandwidth drifts over minutes on a shared machine: measure before and after
    # the engines run and take the median of all samples.
    before = measure_read_bandwidth(settings.bandwidth_bytes)
    engines, skipped = [], {}
    for mode in modes:
        print(f"{mode.name}: loading {model_dir}", flush=True)
        try:
            engines.append(ENGINES[mode.engine](model_dir, mode, settings))
        except (ValueError, NotImplementedError) as e:     # the mode cannot apply here
            skipped[mode.name] = str(e)
            print(f"{mode.name}: skipped: {e}", flush=True)
    report["skipped"] = skipped
    modes = [m for m in modes if m.name not in skipped]
    if not engines:
        raise SystemExit("no mode could run on this model: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    report["model"]["num_params"] = engines[0].num_params
    sizes = {e.name: (e.weight_bytes, e.weight_bytes_per_token) for e in engines}
    report["engines"], greedy = measure(engines, settings)
    for e in engines:
        e.close()
    del engines
    gc.collect()
    after = measure_read_bandwidth(settings.bandwidth_bytes)

    seconds = before["seconds"] + after["seconds"]
    bandwidth = settings.bandwidth_bytes / statistics.median(seconds)
    report["bandwidth"] = {
        "read_bytes_per_s": bandwidth, "before_bytes_per_s": before["bytes_per_s"],
        "after_bytes_per_s": after["bytes_per_s"], "tensor_bytes": settings.bandwidth_bytes,
        "threads": before["threads"]}
    for mode in modes:
        result = report["engines"][mode.name]
        held, per_token = sizes[mode.name]
        # KV-cache reads are left out: at these short contexts they are a few percent
        # of the weights, so the floor is a slight overestimate of what is reachable.
        floor = bandwidth / per_token
        result.update(mode=asdict(mode), weight_bytes=held, weight_bytes_per_token=per_token,
                      batch1_floor_tokens_per_s=floor)
        for dec in result["decode"].values():
            # A step reads the weights once for the whole batch: the floor scales with it.
            dec["floor_tokens_per_s"] = dec["batch"] * floor
            dec["fraction_of_floor"] = dec["tokens_per_s"] / dec["floor_tokens_per_s"]
        result["batch1_fraction_of_floor"] = (result["decode"]["1"]["fraction_of_floor"]
                                              if "1" in result["decode"] else None)
    # Information only: kernels that sum in another order may flip a near-tie, and
    # quantized weights are another model.
    names = [m.name for m in modes]
    report["batch1_greedy_agreement"] = {}
    for mode in modes:
        ref = _reference(mode, names)
        if ref is None or mode.name not in greedy:
            continue
        a, b = greedy[mode.name], greedy[ref]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        report["batch1_greedy_agreement"][mode.name] = {
            "reference": ref, "matching_prefix": same, "of": min(len(a), len(b))}
    return report


def print_report(report: dict) -> None:
    settings = report["settings"]
    batches = settings["decode_batches"]
    headers = ["mode", "weights MB", "read/tok MB"]
    headers += [f"TTFT p{n} ms" for n in settings["ttft_prompt_lens"]]
    headers += [f"tok/s b{b}" for b in batches]
    headers += ["floor b1 tok/s"] + [f"b{b} % floor" for b in batches]
    rows = []
    for name, r in report["engines"].items():
        row = [name, r["weight_bytes"] / 1e6, r["weight_bytes_per_token"] / 1e6]
        row += [r["ttft_s"][str(n)]["median"] * 1e3 for n in settings["ttft_prompt_lens"]]
        ran = [r["decode"].get(str(b)) for b in batches]         # None: batch not run
        row += [d["tokens_per_s"] if d else None for d in ran]
        row += [r["batch1_floor_tokens_per_s"]]
        row += [100 * d["fraction_of_floor"] if d else None for d in ran]
        rows.append(row)
    bw, model = report["bandwidth"], report["model"]
    print()
    print(f"model {model['dir']} ({model['num_params'] / 1e6:.1f}M params); "
          f"decode: prompt {settings['decode_prompt_len']}, "
          f"{settings['decode_new_tokens']} new tokens; medians")
    print(format_table(headers, rows))
    print(f"read bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s "
          f"(before {bw['before_bytes_per_s'] / 1e9:.1f}, after {bw['after_bytes_per_s'] / 1e9:.1f}; "
          f"{bw['threads']} threads); floor at batch b = b x bandwidth / read per token")
    agree = ", ".join(f"{name} {a['matching_prefix']}/{a['of']} vs {a['reference']}"
                      for name, a in report["batch1_greedy_agreement"].items())
    print(f"batch-1 greedy tokens agree: {agree}")
    for name, reason in report.get("skipped", {}).items():
        print(f"skipped {name}: {reason}")


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8; got {text!r}")
    return values


def _mode_list(text: str) -> list[Mode]:
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names or any(n not in MODES for n in names):
        raise argparse.ArgumentTypeError(f"bad modes {text!r}; choose from {','.join(MODES)}")
    return [MODES[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory (HF layout), .gguf file or preset:NAME")
    parser.add_argument("--modes", type=_mode_list, default=None,
                        help=f"comma-separated, of {','.join(MODES)} "
                             "(default: all; with --quick: " + ",".join(QUICK_MODES) + ")")
    parser.add_argument("--batches", type=_int_list, default=None,
                        help="decode batch sizes, e.g. 1,8 (default: 1,8,32; --quick 1,4)")
    parser.add_argument("--out", default="results/decode.json", help="where to write JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every engine and the bandwidth probe "
                             "(default: torch's own choice, one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        # When other processes load the cores, OpenMP barriers wait on descheduled
        # threads and small ops slow down by 100x; fewer threads show it.
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    if args.batches:
        settings = Settings(**{**asdict(settings), "decode_batches": args.batches})
    modes = args.modes or [MODES[n] for n in (QUICK_MODES if args.quick else MODES)]
    model = args.model
    if model.startswith("preset:"):
        from colocate.model.published import published_path

        model = str(published_path(model[len("preset:"):]))
    report = run(model, modes, settings)
    report["settings"]["quick"] = args.quick
    print_report(report)
    print(f"wrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
