"""Decode benchmark: colocate against HF transformers `generate` on one checkpoint.

    python bench/decode.py --model DIR [--dtype float32] [--out results/decode.json] [--quick]

Measures, for both engines loaded in one process and taking turns call by call:
  - time to first token (TTFT) for a few prompt lengths: the wall time of one call
    that generates a single token, which is prefill + one sample + the API's own cost;
  - decode tokens/s at a few batch sizes, prefill excluded (see `decode_rate`);
  - batch-1 decode as a fraction of the memory-bandwidth floor: weight bytes a step
    must read divided by a read bandwidth measured in this run.
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
from common import (format_table, machine_info, measure_read_bandwidth,  # noqa: E402
                    summarize, time_call, weight_bytes_per_token, write_json)


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


# Small enough for a test to run both engines on the tiny preset in seconds.
QUICK = Settings(ttft_prompt_lens=(16, 64), ttft_repeats=2, decode_batches=(1, 4),
                 decode_prompt_len=8, decode_new_tokens=8, decode_repeats=1,
                 bandwidth_bytes=64 * 2**20)


def make_prompts(settings: Settings, vocab: int, tag: int, count: int, length: int
                 ) -> list[list[int]]:
    """Seeded random token ids, so lengths are exact and both engines get the same
    prompts. `tag` tells apart the calls of a run: every timed call gets prompts of its
    own, so no engine can answer from a cache of an earlier call. Ids 0-2 are the
    tiny checkpoints' special tokens; leave them out."""
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + tag)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


# ---- the two engines behind one small interface -------------------------------
# ttft(prompt) generates one token; decode(prompts, n) generates n tokens for every
# prompt together and returns (start time, arrival events, tokens per prompt). An
# event is (time, tokens that arrived, prompts that have at least one token by then).

class ColocateEngine:
    name = "colocate"

    def __init__(self, model_dir: str, dtype: str, settings: Settings) -> None:
        from colocate import LLM, SamplingParams
        self._params = SamplingParams
        block = 16
        # Room for the largest batch at full length plus one partly used block per
        # sequence, and for the longest TTFT prompt; never a preemption.
        per_seq = settings.decode_prompt_len + settings.decode_new_tokens + block
        kv_tokens = max(settings.max_batch * per_seq, max(settings.ttft_prompt_lens) + 2 * block)
        # Every prefill of the run fits one step, so prefill is never chunked.
        batched = max(4096, max(settings.ttft_prompt_lens),
                      settings.max_batch * settings.decode_prompt_len)
        # Prefix caching off: TTFT must time a prefill, not a cache lookup (the prompts
        # differ per call too; this makes sure).
        self.llm = LLM(model=model_dir, dtype=dtype, block_size=block, kv_cache_tokens=kv_tokens,
                       max_num_seqs=settings.max_batch, max_num_batched_tokens=batched,
                       enable_prefix_caching=False)
        self.vocab_size = self.llm.config.vocab_size
        self.info = {"kv_cache_tokens": kv_tokens, "max_num_seqs": settings.max_batch,
                     "max_num_batched_tokens": batched, "enable_prefix_caching": False}

    def _greedy(self, n: int):
        return self._params(max_tokens=n, temperature=0.0, ignore_eos=True)

    def ttft(self, prompt: list[int]) -> None:
        self.llm.generate([prompt], self._greedy(1))

    def decode(self, prompts: list[list[int]], new_tokens: int):
        # Drive the engine step by step (what LLM.generate does inside) so each step's
        # tokens get a timestamp as they come out.
        engine = self.llm.engine
        params = self._greedy(new_tokens)
        start = time.perf_counter()
        index = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
        tokens: list[list[int]] = [[] for _ in prompts]
        events, unfinished = [], len(prompts)
        while unfinished:
            if not engine.has_unfinished_requests():
                raise RuntimeError("engine went idle before every request finished")
            outputs = engine.step()
            now = time.perf_counter()
            arrived = 0
            for out in outputs:
                tokens[index[out.request_id]].extend(out.new_token_ids)
                arrived += len(out.new_token_ids)
                unfinished -= out.finished
            if arrived:
                events.append((now, arrived, sum(1 for t in tokens if t)))
        return start, events, tokens

    def close(self) -> None:
        del self.llm


class HFEngine:
    name = "hf"

    def __init__(self, model_dir: str, dtype: str, settings: Settings) -> None:
        import transformers
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)).eval()
        config = self.model.config
        self.vocab_size = config.vocab_size
        eos = config.eos_token_id
        self._pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
        self.info = {"attn_implementation": config._attn_implementation}
        embedding = self.model.get_input_embeddings().weight
        self.weight_bytes = weight_bytes_per_token(
            self.model, embedding, tied=bool(config.tie_word_embeddings))
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def _generate(self, prompts: list[list[int]], new_tokens: int, streamer=None):
        # The prompts of one call have equal lengths, so left padding adds nothing; the
        # all-ones mask is passed anyway, as a batch of mixed lengths would need it.
        ids = torch.tensor(prompts)
        # min_new_tokens == max_new_tokens: both engines generate exactly n tokens
        # whatever the model thinks of EOS.
        return self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self._pad,
            streamer=streamer)

    def ttft(self, prompt: list[int]) -> None:
        self._generate([prompt], 1)

    def decode(self, prompts: list[list[int]], new_tokens: int):
        arrivals = _Arrivals()
        start = time.perf_counter()
        out = self._generate(prompts, new_tokens, arrivals)
        batch = len(prompts)
        events = [(t, batch, batch) for t in arrivals.times]
        return start, events, out[:, len(prompts[0]):].tolist()

    def close(self) -> None:
        del self.model


class _Arrivals:
    """A `generate` streamer that only notes when each step's tokens reach the host.
    generate() first hands it the prompt, then one (batch,) tensor per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


ENGINES = {"colocate": ColocateEngine, "hf": HFEngine}


# ---- measuring -------------------------------------------------------------------

def decode_rate(start: float, events: list[tuple[float, int, int]], batch: int) -> dict:
    """Decode tokens/s with prefill left out: the clock starts when every sequence has
    its first token (so all prefills, and the first sample that comes with them, are
    behind us) and stops when the last token arrives; it counts only the tokens that
    arrived in between. Timestamps are taken per engine step as tokens reach the
    caller, so both engines are timed the same way and any per-step overhead of the
    engine (scheduling, sampling, Python) counts, as it would for a user."""
    first = next(i for i, (_, _, started) in enumerate(events) if started == batch)
    window_start = events[first][0]
    later = events[first + 1:]
    if not later:
        raise ValueError("need at least 2 new tokens to time decode")
    tokens = sum(n for _, n, _ in later)
    total = sum(n for _, n, _ in events)
    return {"tokens_per_s": tokens / (later[-1][0] - window_start),
            "decode_tokens": tokens,
            "end_to_end_tokens_per_s": total / (events[-1][0] - start)}


def measure(engines: list, settings: Settings) -> tuple[dict, dict[str, list[int]]]:
    """TTFT and decode results per engine, and each engine's batch-1 greedy tokens (for
    a cross-check). The engines take turns call by call on the same prompts, rather
    than one running after the other: the load other processes put on this shared
    machine drifts over minutes, and taking turns spreads that drift over both."""
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
        runs: dict[str, list[dict]] = {e.name: [] for e in engines}
        warm = make_prompts(settings, vocab, tag=-batch, count=batch, length=plen)
        for e in engines:
            # A short untimed run at this batch size pays first-call costs of its shapes.
            e.decode(warm, 4)
        for r in range(settings.decode_repeats):
            prompts = make_prompts(settings, vocab, tag=10**8 + batch * 100 + r,
                                   count=batch, length=plen)
            for e in engines:
                start, events, tokens = e.decode(prompts, n)
                if any(len(t) != n for t in tokens):
                    raise RuntimeError(f"{e.name} returned {[len(t) for t in tokens]} "
                                       f"tokens, expected {n} each")
                runs[e.name].append(decode_rate(start, events, batch))
                if batch == 1 and r == 0:
                    greedy[e.name] = tokens[0]
        for e in engines:
            rates = [run["tokens_per_s"] for run in runs[e.name]]
            results[e.name]["decode"][str(batch)] = {
                "batch": batch, "prompt_len": plen, "new_tokens": n,
                "tokens_per_s": statistics.median(rates), "samples_tokens_per_s": rates,
                # Under contention from other processes the best run is the closest
                # to what the engine can do; the median is what a user would see.
                "best_tokens_per_s": max(rates),
                "end_to_end_tokens_per_s": statistics.median(
                    run["end_to_end_tokens_per_s"] for run in runs[e.name])}
        _progress(results, f"decode batch {batch} (tok/s)",
                  lambda r: r["decode"][str(batch)]["tokens_per_s"])
    return results, greedy


def _progress(results: dict, what: str, value) -> None:
    print(f"  {what}: " + ", ".join(f"{name} {value(r):.1f}" for name, r in results.items()),
          flush=True)


def run(model_dir: str, dtype: str, settings: Settings) -> dict:
    report: dict = {"benchmark": "decode", "machine": machine_info(),
                    "model": {"dir": str(model_dir), "dtype": dtype},
                    "settings": asdict(settings)}
    # Bandwidth drifts over minutes on a shared machine: measure before and after
    # the engines run and take the median of all samples.
    before = measure_read_bandwidth(settings.bandwidth_bytes)
    engines = []
    for cls in ENGINES.values():
        print(f"{cls.name}: loading {model_dir}", flush=True)
        engines.append(cls(model_dir, dtype, settings))
    hf = next(e for e in engines if isinstance(e, HFEngine))
    report["model"].update(num_params=hf.num_params, weight_bytes_per_token=hf.weight_bytes)
    report["engines"], greedy = measure(engines, settings)
    for e in engines:
        e.close()
    del engines, hf
    gc.collect()
    after = measure_read_bandwidth(settings.bandwidth_bytes)

    seconds = before["seconds"] + after["seconds"]
    bandwidth = settings.bandwidth_bytes / statistics.median(seconds)
    floor = bandwidth / report["model"]["weight_bytes_per_token"]
    report["bandwidth"] = {
        "read_bytes_per_s": bandwidth, "before_bytes_per_s": before["bytes_per_s"],
        "after_bytes_per_s": after["bytes_per_s"], "tensor_bytes": settings.bandwidth_bytes,
        "threads": before["threads"],
        # KV-cache reads are left out: at these short contexts they are a few percent
        # of the weights, so the floor is a slight overestimate of what is reachable.
        "batch1_floor_tokens_per_s": floor}
    for result in report["engines"].values():
        result["batch1_fraction_of_floor"] = result["decode"]["1"]["tokens_per_s"] / floor \
            if "1" in result["decode"] else None
    a, b = greedy.get("colocate", []), greedy.get("hf", [])
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    # Information only: fp32 kernels that sum in another order may flip a near-tie.
    report["batch1_greedy_agreement"] = {"matching_prefix": same, "of": min(len(a), len(b))}
    return report


def print_report(report: dict) -> None:
    settings = report["settings"]
    headers = ["engine"]
    headers += [f"TTFT p{n} ms" for n in settings["ttft_prompt_lens"]]
    headers += [f"tok/s b{b}" for b in settings["decode_batches"]]
    headers += ["b1 % floor"]
    rows = []
    for name, r in report["engines"].items():
        row = [name]
        row += [r["ttft_s"][str(n)]["median"] * 1e3 for n in settings["ttft_prompt_lens"]]
        row += [r["decode"][str(b)]["tokens_per_s"] for b in settings["decode_batches"]]
        frac = r["batch1_fraction_of_floor"]
        row.append(None if frac is None else 100 * frac)
        rows.append(row)
    bw, model = report["bandwidth"], report["model"]
    print()
    print(f"model {model['dir']} ({model['num_params'] / 1e6:.1f}M params, {model['dtype']}); "
          f"decode: prompt {settings['decode_prompt_len']}, "
          f"{settings['decode_new_tokens']} new tokens; medians")
    print(format_table(headers, rows))
    print(f"read bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s "
          f"(before {bw['before_bytes_per_s'] / 1e9:.1f}, after {bw['after_bytes_per_s'] / 1e9:.1f}; "
          f"{bw['threads']} threads); weights read per token "
          f"{model['weight_bytes_per_token'] / 1e6:.1f} MB; "
          f"batch-1 floor {bw['batch1_floor_tokens_per_s']:.1f} tok/s")
    agree = report["batch1_greedy_agreement"]
    print(f"batch-1 greedy tokens agree for {agree['matching_prefix']}/{agree['of']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="results/decode.json", help="where to write JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both engines and the bandwidth probe "
                             "(default: torch's own choice, one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        # When other processes load the cores, OpenMP barriers wait on descheduled
        # threads and small ops slow down by 100x; fewer threads show it.
        torch.set_num_threads(args.threads)
    report = run(args.model, args.dtype, QUICK if args.quick else Settings())
    report["settings"]["quick"] = args.quick
    print_report(report)
    print(f"wrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
