"""bench/decode.py --quick runs end to end on the tiny preset and writes JSON of the
promised shape. Only structure is checked: speed on a shared CPU proves nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
ENGINES = ("colocate", "hf")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from colocate.model.tiny import write_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("bench_decode")
    model = write_tiny_checkpoint(tmp / "tiny", preset="tiny", seed=0)
    out = tmp / "decode.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tok/s" in proc.stdout          # the table was printed
    return json.loads(out.read_text())


def test_machine_and_model(report):
    machine = report["machine"]
    assert positive(machine["cpu_count"])
    assert machine["torch_version"] and machine["date"]
    assert positive(report["model"]["weight_bytes_per_token"])
    assert report["settings"]["quick"] is True


def test_bandwidth_and_floor(report):
    bw = report["bandwidth"]
    for key in ("read_bytes_per_s", "before_bytes_per_s", "after_bytes_per_s",
                "batch1_floor_tokens_per_s"):
        assert positive(bw[key]), key


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_results(report, engine):
    settings = report["settings"]
    result = report["engines"][engine]
    assert set(result["ttft_s"]) == {str(n) for n in settings["ttft_prompt_lens"]}
    for ttft in result["ttft_s"].values():
        assert positive(ttft["median"])
        assert len(ttft["samples"]) == settings["ttft_repeats"]
    assert set(result["decode"]) == {str(b) for b in settings["decode_batches"]}
    for batch, dec in result["decode"].items():
        assert dec["batch"] == int(batch)
        assert positive(dec["tokens_per_s"]) and positive(dec["end_to_end_tokens_per_s"])
        assert len(dec["samples_tokens_per_s"]) == settings["decode_repeats"]
    assert positive(result["batch1_fraction_of_floor"])
