"""The tenants' side of bench/colocation.py: what each tenant sends, and when, and what
it sees come back.

A tenant's requests are fixed by (seed, stream, index) alone: prompt and output
lengths are drawn per request, arrivals from one seeded Poisson clock per stream, so
every scenario (alone, shared, unshared, peer) replays exactly the same requests at
exactly the same offsets, and only the servers differ.

Latencies are taken at the client, as a tenant sees them: TTFT from sending the
request to the first streamed token; inter-token latency between consecutive
tokens after the first message (a message carrying k tokens counts as k gaps of 1/k
of its wait, so servers that send several tokens a message compare fairly with ones
that send one at a time); end-to-end from sending to the last message.
"""
from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from colocate import progress


@dataclass(frozen=True)
class LoadSpec:
    """One tenant's load. Open loop (`rate`, Poisson arrivals) or closed loop
    (`concurrency` requests always in flight); it stops at `duration_s` or after
    `num_requests`, whichever comes first (at least one of them is set).

    `flood`: a closed loop for tenant 0 only (the neighbour), while tenant 1 keeps
    `flood` requests in flight until tenant 0 is done and the others send nothing;
    alone, with tenant 0 only, is then the neighbour's own baseline."""
    rate: float | None = None
    concurrency: int | None = None
    flood: int | None = None
    duration_s: float | None = None
    num_requests: int | None = None
    prompt_tokens: tuple[int, int] = (32, 512)     # inclusive range, uniform
    output_tokens: tuple[int, int] = (16, 128)
    seed: int = 0
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")
        if self.flood is not None and self.concurrency is None:
            raise ValueError("a flood is a closed loop: give concurrency")
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("give a duration or a request count")

    @property
    def label(self) -> str:
        if self.flood is not None:
            return f"flood {self.flood} beside {self.concurrency}"
        return f"{self.rate:g} req/s" if self.rate is not None else f"{self.concurrency} conc"

    def in_flight(self, stream: int) -> int:
        """Closed loop: the requests tenant `stream` keeps in flight."""
        if self.flood is None:
            return self.concurrency or 0
        return {0: self.concurrency, 1: self.flood}.get(stream, 0)


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    prompt: str
    max_tokens: int
    target_prompt_tokens: int


@dataclass
class RequestRecord:
    service: str
    index: int
    sent_s: float                    # offset from the start of the run
    target_prompt_tokens: int
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None  # as the server counted them, where it says
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        """Everything but the per-token gaps, which the summary already holds."""
        return {k: v for k, v in self.__dict__.items() if k != "itl_s"}


# ---- what to send ---------------------------------------------------------------------

class PromptMaker:
    """Text prompts of a given length in tokens of one checkpoint's tokenizer.

    Text, not token ids, because an OpenAI-compatible peer takes only text; every
    scenario gets the same text. Random ids do not survive decode-then-encode exactly,
    so the text is re-encoded and trimmed a few times until it lands within a token or
    two of the target; the server's own count is recorded beside the target."""

    def __init__(self, checkpoint: str | Path) -> None:
        """checkpoint: a model directory (its tokenizer.json) or a GGUF file."""
        from colocate.model.tokenizer import Tokenizer
        self._tok = Tokenizer.from_pretrained(checkpoint).backend
        self._vocab = self._tok.get_vocab_size()

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def make(self, rng: random.Random, length: int) -> str:
        # Ids below 3 are special tokens in the checkpoints this project writes.
        text = self._tok.decode([rng.randrange(3, self._vocab) for _ in range(length)])
        for _ in range(4):
            ids = self._tok.encode(text, add_special_tokens=False).ids
            if abs(len(ids) - length) <= 1:
                break
            if len(ids) < length:
                ids += [rng.randrange(3, self._vocab) for _ in range(length - len(ids))]
            text = self._tok.decode(ids[:length])
        return text


def planned_request(spec: LoadSpec, prompts: PromptMaker, stream: int, index: int
                    ) -> PlannedRequest:
    """Request `index` of tenant `stream`: the same in every scenario and every rate."""
    rng = random.Random(f"{spec.seed}/{stream}/{index}")
    plen = rng.randint(*spec.prompt_tokens)
    return PlannedRequest(index, prompts.make(rng, plen), rng.randint(*spec.output_tokens), plen)


def arrival_offsets(spec: LoadSpec, stream: int) -> list[float]:
    """Poisson arrivals (exponential gaps at `rate`) of tenant `stream`, in seconds
    from the start, cut at the duration and the request count."""
    rng = random.Random(f"arrivals/{spec.seed}/{stream}")
    out, t = [], 0.0
    while spec.num_requests is None or len(out) < spec.num_requests:
        t += rng.expovariate(spec.rate)
        if spec.duration_s is not None and t > spec.duration_s:
            break
        out.append(t)
    return out


# ---- how to send it: one adapter per API ----------------------------------------------

@dataclass
class Chunk:
    tokens: int                       # tokens this message carried
    prompt_tokens: int | None = None  # on the last message, where the API says
    total_tokens: int | None = None   # the server's count of output tokens, likewise


class Target(Protocol):
    name: str

    def stream(self, prompt: str, max_tokens: int, timeout: float) -> Iterator[Chunk]: ...

    def close(self) -> None: ...


class ColocateTarget:
    """A colocate service over gRPC, greedy, every output to its full length
    (ignore_eos: random weights would otherwise stop at random points)."""

    def __init__(self, name: str, target: str, token: str) -> None:
        from colocate.client import Client
        self.name = name
        self._client = Client(target, token)   # one channel, shared by the threads

    def stream(self, prompt: str, max_tokens: int, timeout: float) -> Iterator[Chunk]:
        for delta in self._client.generate(prompt, max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True, timeout=timeout):
            yield Chunk(len(delta.token_ids),
                        delta.usage.prompt_tokens if delta.usage else None)

    def close(self) -> None:
        self._client.close()


class OpenAITarget:
    """`POST {base}/v1/completions` with `stream: true`, read as server-sent events.
    `extra` goes into every body: how to make that server ignore EOS differs
    (vLLM and SGLang take `ignore_eos`; `transformers serve` a generation config)."""

    def __init__(self, name: str, base_url: str, model: str, extra: dict | None = None,
                 token: str | None = None) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.extra = extra or {}
        self.headers = {"Content-Type": "application/json"}
        if token is not None:                     # a colocate service's tenant
            self.headers["Authorization"] = f"Bearer {token}"

    def body(self, prompt: str, max_tokens: int) -> dict:
        extra = {k: (max_tokens if v == "{max_tokens}" else
                     v.replace("{max_tokens}", str(max_tokens)) if isinstance(v, str) else v)
                 for k, v in self.extra.items()}
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, **extra}

    def stream(self, prompt: str, max_tokens: int, timeout: float) -> Iterator[Chunk]:
        req = urllib.request.Request(self.url, json.dumps(self.body(prompt, max_tokens)).encode(),
                                     self.headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:                       # one SSE line at a time, unchunked
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                msg = json.loads(data)
                text = "".join(c.get("text") or "" for c in msg.get("choices", []))
                usage = msg.get("usage") or {}
                # The API does not say how many tokens a text chunk holds; one each is
                # what these servers send. The final usage, if any, corrects the total.
                yield Chunk(1 if text else 0, usage.get("prompt_tokens"),
                            usage.get("completion_tokens"))

    def close(self) -> None:
        pass


def send(target: Target, planned: PlannedRequest, record: RequestRecord, t0: float,
         timeout: float) -> None:
    """Stream one request, filling `record` as the tenant sees it."""
    start = time.perf_counter()
    record.sent_s = start - t0
    last, server_total = None, None
    try:
        for chunk in target.stream(planned.prompt, planned.max_tokens, timeout):
            now = time.perf_counter()
            if chunk.prompt_tokens is not None:
                record.prompt_tokens = chunk.prompt_tokens
            if chunk.total_tokens is not None:
                server_total = chunk.total_tokens
            if chunk.tokens == 0:
                continue
            if last is None:
                # Tokens sharing the first message arrived with it: their spacing is
                # not observable, so they add no gaps.
                record.ttft_s = now - start
            else:
                record.itl_s.extend([(now - last) / chunk.tokens] * chunk.tokens)
            record.output_tokens += chunk.tokens
            last = now
        record.e2e_s = time.perf_counter() - start
        if server_total is not None:       # trust the server over our count of chunks
            record.output_tokens = server_total
        if record.output_tokens == 0:
            record.error = "no tokens"
    except Exception as exc:   # a failed request is a result, not a crash of the run
        record.error = f"{type(exc).__name__}: {getattr(exc, 'details', lambda: '')() or exc}"


# ---- the load driver ------------------------------------------------------------------

def planned_total(spec: LoadSpec, streams: int) -> int | None:
    """Requests the load will send over `streams` tenants; None when only a duration
    bounds a closed loop."""
    if spec.rate is not None:
        return sum(len(arrival_offsets(spec, s)) for s in range(streams))
    if spec.flood is not None or spec.num_requests is None:
        return None                          # the flood lasts as long as the neighbour
    return spec.num_requests * streams


def run_load(targets: list[Target], spec: LoadSpec, prompts: PromptMaker,
             drain_timeout_s: float | None = None,
             label: str = "load") -> tuple[list[RequestRecord], float]:
    """Drive every target with its own tenant's load at once (target i replays stream
    i); return every request's record and the wall seconds from start to the last
    answer. Requests still running `drain_timeout_s` after the load ends are failed.
    Shows requests done of the total as a progress stage named `label`."""
    with progress.stage(label, planned_total(spec, len(targets)), "request") as bar:
        return _run_load(targets, spec, prompts, drain_timeout_s, bar)


def _run_load(targets: list[Target], spec: LoadSpec, prompts: PromptMaker,
              drain_timeout_s: float | None,
              bar: progress.Stage) -> tuple[list[RequestRecord], float]:
    t0 = time.perf_counter()
    records: list[RequestRecord] = []
    lock = threading.Lock()
    workers: list[threading.Thread] = []

    def one(target: Target, stream: int, index: int) -> None:
        planned = planned_request(spec, prompts, stream, index)
        rec = RequestRecord(target.name, index, 0.0, planned.target_prompt_tokens,
                            planned.max_tokens)
        with lock:
            records.append(rec)
        send(target, planned, rec, t0, spec.request_timeout_s)
        bar.advance(1)

    def open_loop(target: Target, stream: int) -> None:
        for index, offset in enumerate(arrival_offsets(spec, stream)):
            time.sleep(max(0.0, t0 + offset - time.perf_counter()))
            spawn(lambda i=index: one(target, stream, i))

    def closed_loop(target: Target, stream: int, counter: Callable[[], int | None]) -> None:
        while (index := counter()) is not None:
            one(target, stream, index)

    def spawn(fn: Callable[[], None]) -> None:
        w = threading.Thread(target=fn, daemon=True)
        with lock:
            workers.append(w)
        w.start()

    drivers = []
    neighbour_done = threading.Event()       # a flood ends with its neighbour's load
    for stream, target in enumerate(targets):
        if spec.rate is not None:
            drivers.append(threading.Thread(target=open_loop, args=(target, stream), daemon=True))
            continue
        counter = (_Counter(spec, t0, until=neighbour_done) if spec.flood and stream == 1
                   else _Counter(spec, t0))
        drivers += [threading.Thread(target=closed_loop, args=(target, stream, counter),
                                     daemon=True) for _ in range(spec.in_flight(stream))]
    if spec.flood:                           # the neighbour's drivers, then the flood ends
        drivers.append(threading.Thread(target=_set_after, daemon=True, args=(
            drivers[:spec.in_flight(0)], neighbour_done)))
    for d in drivers:
        d.start()
    for d in drivers:              # open loop: all arrivals sent; closed: all done or timed out
        d.join()
    deadline = time.perf_counter() + (drain_timeout_s or spec.request_timeout_s)
    for w in list(workers):
        w.join(max(0.0, deadline - time.perf_counter()))
    with lock:
        done = list(records)
    for rec in done:
        if rec.e2e_s is None and rec.error is None:
            rec.error = "unfinished at the end of the run"
    ends = [r.sent_s + r.e2e_s for r in done if r.e2e_s is not None]
    return done, (max(ends) if ends else time.perf_counter() - t0)


def _set_after(threads: list[threading.Thread], event: threading.Event) -> None:
    for t in threads:
        t.join()
    event.set()


class _Counter:
    """Hands out the next request index of one closed-loop tenant, or None when the
    count is reached or the duration has passed."""

    def __init__(self, spec: LoadSpec, t0: float, until: threading.Event | None = None) -> None:
        """until: a flood's tenant, which sends until the event, not a count."""
        self._next, self._lock, self._spec, self._t0 = 0, threading.Lock(), spec, t0
        self._until = until

    def __call__(self) -> int | None:
        with self._lock:
            spec = self._spec
            if self._until is not None:
                if self._until.is_set():
                    return None
            elif spec.num_requests is not None and self._next >= spec.num_requests:
                return None
            if spec.duration_s is not None and time.perf_counter() - self._t0 > spec.duration_s:
                return None
            self._next += 1
            return self._next - 1
