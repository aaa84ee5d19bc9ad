"""bench/colocation.py end to end at a toy size: the tiny checkpoint, two services,
three requests per tenant, every scenario (the peer runs if `transformers serve` can
here, else it must be skipped with its reason). Checks the JSON's shape and that the
request counts add up; never speed, which on a shared CPU proves nothing."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "colocation.py"
sys.path.insert(0, str(SCRIPT.parent))
import colocation  # noqa: E402
from colocation_load import (LoadSpec, PromptMaker, arrival_offsets,  # noqa: E402
                             planned_request, run_load)
from colocation_peers import (llamacpp_command, peer_commands,  # noqa: E402
                              peer_unavailable)
from colocation_report import headline_ratios, scenario_result  # noqa: E402
from colocation_load import RequestRecord  # noqa: E402
from colocation_servers import (load_bench_config, scenario_configs,  # noqa: E402
                                write_default_config)

SERVICES, REQUESTS = 2, 3
SCENARIOS = ("alone", "shared", "fused", "unshared", "peer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_colocation") / "tiny"
    colocate = Path(sys.executable).parent / "colocate"
    subprocess.run([str(colocate), "tiny-model", str(out), "--preset", "tiny"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    results = tmp_path_factory.mktemp("bench_colocation_results")
    # A rate far above what the services answer: all three requests arrive at once.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny), "--services", str(SERVICES),
         "--requests", str(REQUESTS), "--rate", "50", "--prompt-tokens", "8,24",
         "--output-tokens", "3,6", "--kv-tokens", "256", "--max-model-len", "128",
         "--startup-timeout", "120", "--request-timeout", "60", "--results", str(results)],
        capture_output=True, text=True, timeout=300, cwd=results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results, json.loads((results / "colocation.json").read_text()), proc.stdout


def ok_scenarios(data: dict) -> dict[str, dict]:
    return {n: s for n, s in data["runs"][0]["scenarios"].items() if s["status"] == "ok"}


@pytest.mark.slow          # starts three deployments and the peers
def test_json_structure(run):
    _, data, stdout = run
    assert {"machine", "config", "settings", "skipped", "runs", "plots"} <= set(data)
    assert data["machine"]["cpu_count"] >= 1 and len(data["machine"]["load_average_before"]) == 3
    assert len(data["config"]["services"]) == SERVICES
    (r,) = data["runs"]
    assert r["rate"] == 50 and r["concurrency"] is None
    assert tuple(r["scenarios"]) == SCENARIOS
    assert {"alone", "shared", "fused", "unshared"} <= set(ok_scenarios(data))
    for name, sc in ok_scenarios(data).items():
        for group in [sc["overall"], *sc["services"].values()]:
            for key in ("ttft_s", "itl_s", "e2e_s"):
                assert set(group[key]) == {"n", "mean", "p50", "p90", "p99"}, (name, key)
                assert group[key]["p50"] <= group[key]["p90"] <= group[key]["p99"]
            assert group["output_tokens_per_s"] > 0
        assert sc["memory"]["total_bytes"] > 0 and sc["memory"]["kind"] == "PSS"
    mem = {n: s["memory"] for n, s in ok_scenarios(data).items()}
    assert (mem["shared"]["weight_copies"], mem["unshared"]["weight_copies"]) == (1, SERVICES)
    assert mem["fused"]["weight_copies"] == 1
    assert "supervisor" in mem["shared"]["per_process"]
    ratios = r["ratios"]
    assert all(isinstance(ratios[f"{k}_mean_{mode}_over_alone"], float)
               for k in ("ttft", "itl", "e2e") for mode in ("shared", "fused"))
    assert isinstance(ratios["memory_shared_over_unshared"], float)
    assert "headline ratios" in stdout and "TTFT p50 ms" in stdout


@pytest.mark.slow          # starts three deployments and the peers
def test_request_counts_add_up(run):
    _, data, _ = run
    for name, sc in ok_scenarios(data).items():
        services = 1 if name == "alone" else SERVICES
        assert len(sc["services"]) == services
        overall = sc["overall"]
        assert overall["requests"] == services * REQUESTS == len(sc["records"])
        assert overall["completed"] + overall["failed"] == overall["requests"]
        assert sum(s["requests"] for s in sc["services"].values()) == overall["requests"]
        assert sum(s["completed"] for s in sc["services"].values()) == overall["completed"]
        assert overall["failed"] == 0, (name, overall["errors"])
        done = [rec for rec in sc["records"] if rec["error"] is None]
        assert sum(rec["output_tokens"] for rec in done) == overall["output_tokens"]
        # EOS is ignored everywhere, so every answer is exactly as long as asked.
        assert all(rec["output_tokens"] == rec["max_tokens"] for rec in done), name
        assert all(3 <= rec["max_tokens"] <= 6 for rec in done)
        assert overall["ttft_s"]["n"] == overall["completed"]


@pytest.mark.slow          # starts three deployments and the peers
def test_peer_ran_or_says_why(run):
    _, data, _ = run
    peer = data["runs"][0]["scenarios"]["peer"]
    if peer["status"] == "ok":
        assert "transformers serve" in peer["command"]
    else:
        assert peer["status"] == "skipped" and peer["reason"]
        assert data["skipped"]["peer"] == peer["reason"]


@pytest.mark.slow          # starts three deployments and the peers
def test_outputs_written(run):
    results, data, _ = run
    md = (results / "colocation.md").read_text()
    assert "TTFT p50 ms" in md and "memory_shared_over_unshared" in md
    for name in data["plots"]:
        assert (results / name).stat().st_size > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plots"] == []
    else:
        assert "latency.png" in data["plots"] and "memory.png" in data["plots"]


def test_peer_skip_is_recorded_without_starting_anything(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(colocation, "peer_unavailable", lambda peer, device, ckpt: "no")
    config = load_bench_config(write_default_config(
        tmp_path / "d.yaml", str(tiny), 2, kv_tokens=256, max_model_len=128, max_num_seqs=4))
    args = Namespace(peer="transformers", peer_url=[], peer_model=None, threads=1,
                     startup_timeout=1)
    runs, skipped = [{"scenarios": {}}, {"scenarios": {}}], {}
    colocation.run_scenario("peer", scenario_configs(config), args, tmp_path, None, [], runs,
                            skipped)
    assert skipped == {"peer": "no"}
    assert all(r["scenarios"]["peer"] == {"status": "skipped", "reason": "no"} for r in runs)


def test_peers_are_started_only_on_cpu_and_llamacpp_only_on_a_gguf():
    assert "--peer-url" in peer_unavailable("transformers", "cuda:0", "m")
    assert "--peer-url" in peer_unavailable("llamacpp", "cuda:0", "m.gguf")
    assert "GGUF" in peer_unavailable("llamacpp", "cpu", "/models/tiny")


def test_peer_commands(tiny, tmp_path):
    cmd = llamacpp_command("/m/x.gguf", 8123, 2, 4096)
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--model": "/m/x.gguf", "--host": "127.0.0.1", "--port": "8123",
                     "--n_threads": "2", "--n_threads_batch": "2", "--n_ctx": "4096",
                     "--n_batch": "512", "--verbose": "False"}
    config = load_bench_config(write_default_config(
        tmp_path / "d.yaml", str(tiny), 2, kv_tokens=256, max_model_len=128, max_num_seqs=4))
    cmds = peer_commands("transformers", config, 1, [9001, 9002])
    assert [c[c.index("--port") + 1] for c in cmds] == ["9001", "9002"]
    assert all(c[1:3] == ["serve", str(tiny)] and "--continuous-batching" in c for c in cmds)
    # 256 KV tokens in blocks of 16.
    assert all(c[c.index("--cb-num-blocks") + 1] == "16" for c in cmds)


def test_the_loads_each_option_adds():
    specs = colocation.load_specs(colocation.parse_args(
        ["--concurrency", "1", "--rate", "0.5", "--saturate", "6", "--flood", "8",
         "--requests", "4", "--peer", "llamacpp"]))
    assert [s.label for s in specs] == ["1 conc", "0.5 req/s", "6 conc", "flood 8 beside 1"]
    assert all(s.num_requests == 4 for s in specs)
    assert [s.seed for s in specs] == [0, 1, 2, 3]      # no prompt replayed across loads
    flood = specs[-1]
    assert [flood.in_flight(i) for i in range(3)] == [1, 8, 0]
    assert [specs[2].in_flight(i) for i in range(3)] == [6, 6, 6]
    (default,) = colocation.load_specs(colocation.parse_args([]))
    assert default.rate == colocation.DEFAULT_RATE
    with pytest.raises(SystemExit):
        colocation.parse_args(["--peer", "vllm"])
    with pytest.raises(ValueError, match="closed loop"):
        LoadSpec(rate=1.0, flood=8, num_requests=1)


def _records(service, e2e, tokens, n=2):
    return [RequestRecord(service, i, 0.0, 10, tokens, ttft_s=e2e / 4, e2e_s=e2e,
                          output_tokens=tokens, itl_s=[e2e / 8] * 4) for i in range(n)]


def test_headline_ratios_on_synthetic_records():
    alone = scenario_result(_records("svc-0", 2.0, 10), 4.0, ["svc-0"], {"total_bytes": 100})
    fused = scenario_result(_records("svc-0", 2.5, 10) + _records("svc-1", 9.0, 10), 5.0,
                            ["svc-0", "svc-1"], {"total_bytes": 150})
    shared = scenario_result(_records("svc-0", 3.0, 10) + _records("svc-1", 3.0, 10), 10.0,
                             ["svc-0", "svc-1"], {"total_bytes": 300})
    peer = scenario_result(_records("svc-0", 2.0, 10) + _records("svc-1", 3.5, 10), 5.0,
                           ["svc-0", "svc-1"], {"total_bytes": 600})
    r = headline_ratios({"alone": alone, "shared": shared, "fused": fused, "peer": peer})
    # The neighbour (svc-0) against alone, whatever svc-1 (the flood) went through.
    assert r["e2e_mean_fused_over_alone"] == pytest.approx(1.25)
    assert r["ttft_mean_shared_over_alone"] == pytest.approx(1.5)
    assert r["e2e_mean_fused_over_peer"] == pytest.approx(5.75 / 2.75)
    # 40 tokens in 5 s against 40 in 10 s.
    assert r["output_tok_s_fused_over_shared"] == pytest.approx(2.0)
    assert r["memory_fused_over_peer"] == pytest.approx(0.25)
    assert headline_ratios({"alone": alone})["output_tok_s_fused_over_shared"] is None


def test_a_flood_lasts_as_long_as_its_neighbour(prompts):
    spec = LoadSpec(concurrency=1, flood=4, num_requests=3, prompt_tokens=(8, 16),
                    output_tokens=(3, 9))
    records, _ = run_load([FakeTarget("n"), FakeTarget("f"), FakeTarget("idle")], spec, prompts)
    mine = {name: [r for r in records if r.service == name] for name in ("n", "f", "idle")}
    assert sorted(r.index for r in mine["n"]) == [0, 1, 2]
    assert len(mine["f"]) >= 4 and not mine["idle"]
    assert all(r.ok for r in records)


def test_scenarios_differ_only_as_named(tiny, tmp_path):
    config = load_bench_config(write_default_config(
        tmp_path / "d.yaml", str(tiny), 3, kv_tokens=256, max_model_len=128, max_num_seqs=4))
    configs = scenario_configs(config)
    alone, shared, unshared = (configs[n].gpus[0] for n in ("alone", "shared", "unshared"))
    assert [s.name for s in alone.services] == ["svc-0"]
    assert shared.services == unshared.services and len(shared.services) == 3
    assert (shared.share_weights, unshared.share_weights) == (True, False)


# ---- the load driver against a fake server: no deployment, milliseconds -----------

class FakeTarget:
    """Streams max_tokens tokens: the first message carries `first`, then one each."""

    def __init__(self, name: str, first: int = 1) -> None:
        self.name, self.first = name, first

    def stream(self, prompt, max_tokens, timeout):
        from colocation_load import Chunk
        time.sleep(0.002)
        yield Chunk(min(self.first, max_tokens))
        for _ in range(max_tokens - min(self.first, max_tokens)):
            time.sleep(0.001)
            yield Chunk(1)
        yield Chunk(0, prompt_tokens=7)

    def close(self):
        pass


@pytest.fixture(scope="module")
def prompts(tiny):
    return PromptMaker(tiny)


def test_closed_loop_sends_the_count_and_measures_every_gap(prompts):
    spec = LoadSpec(concurrency=2, num_requests=5, prompt_tokens=(8, 16), output_tokens=(3, 9))
    records, wall = run_load([FakeTarget("a"), FakeTarget("b", first=3)], spec, prompts)
    assert wall > 0
    for name, first in (("a", 1), ("b", 3)):
        mine = [r for r in records if r.service == name]
        assert sorted(r.index for r in mine) == list(range(5))
        assert all(r.ok and r.output_tokens == r.max_tokens and r.prompt_tokens == 7
                   for r in mine)
        assert all(len(r.itl_s) == r.max_tokens - min(first, r.max_tokens) for r in mine)
        assert all(r.ttft_s <= r.e2e_s for r in mine)


def test_every_scenario_replays_the_same_requests(prompts):
    spec = LoadSpec(rate=2.0, duration_s=5.0, seed=3)
    assert arrival_offsets(spec, 1) == arrival_offsets(spec, 1) != arrival_offsets(spec, 0)
    assert all(0 < t <= 5.0 for t in arrival_offsets(spec, 1))
    assert len(arrival_offsets(LoadSpec(rate=100.0, duration_s=60, num_requests=4), 0)) == 4
    a, b = planned_request(spec, prompts, 1, 4), planned_request(spec, prompts, 1, 4)
    assert a == b != planned_request(spec, prompts, 2, 4)


def test_prompts_are_close_to_their_length_in_tokens(prompts):
    rng = random.Random(0)
    for length in (8, 32, 200):
        assert abs(prompts.count(prompts.make(rng, length)) - length) <= 2


@pytest.mark.slow          # starts one deployment
def test_the_http_door_drives_colocate_like_the_peers(tiny, tmp_path):
    """--door http: the same load through the services' OpenAI-compatible ports."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny), "--services", "1",
         "--requests", str(REQUESTS), "--rate", "50", "--prompt-tokens", "8,24",
         "--output-tokens", "3,6", "--kv-tokens", "256", "--max-model-len", "128",
         "--scenarios", "alone", "--door", "http", "--startup-timeout", "120",
         "--request-timeout", "60", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "colocation.json").read_text())
    assert data["settings"]["door"] == "http"
    alone = data["runs"][0]["scenarios"]["alone"]
    assert alone["status"] == "ok" and alone["overall"]["failed"] == 0, alone["overall"]
    done = alone["records"]
    assert len(done) == REQUESTS
    assert all(rec["output_tokens"] == rec["max_tokens"] for rec in done)
