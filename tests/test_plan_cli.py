"""`colocate plan` on every example: exit 0 when it fits, 1 (saying why) when not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from colocate.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
FITTING = ["cpu-3x-smollm2.yaml", "a100-3x-llama2-13b.yaml", "rtx4090-llama2-13b.yaml",
           "l4-llama2-13b.yaml", "t4-llama2-13b.yaml"]
TOKEN_VARS = ["TEAM_A_TOKEN", "TEAM_B_TOKEN", "TEAM_C_TOKEN", "CHAT_TOKEN",
              "TENANT_A_TOKEN", "TENANT_B_TOKEN", "TENANT_C_TOKEN"]


@pytest.fixture(autouse=True)
def no_tokens(monkeypatch):
    """A plan needs no secrets: run every test with the token variables unset."""
    for var in TOKEN_VARS:
        monkeypatch.delenv(var, raising=False)


def plan(capsys, name: str) -> tuple[int, str, str]:
    code = main(["plan", str(EXAMPLES / name)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", FITTING)
def test_fitting_examples_exit_0(capsys, name):
    code, out, err = plan(capsys, name)
    assert code == 0, out + err
    assert "plan: every service fits" in out and "DOES NOT FIT" not in out
    assert "bytes/token" in out and "tokens" in out


def test_a100_plan_shows_design_figures(capsys):
    code, out, _ = plan(capsys, "a100-3x-llama2-13b.yaml")
    assert code == 0
    assert "one copy shared by 3 services" in out
    assert out.count("weights llama2-13b") == 1          # counted once, not three times
    assert "7.40 GB" in out                              # int4 g128 weights
    assert out.count("422,400") == 3                     # int8 KV bytes/token, with scales
    assert out.count("50,832") >= 3                      # tokens a 20 GiB int8 pool buys


def test_unshared_fp16_does_not_fit(capsys):
    code, out, _ = plan(capsys, "a100-3x-llama2-13b-unshared-fp16.yaml")
    assert code == 1
    assert "819,200" in out                              # fp16 KV bytes/token
    assert "26.03 GB" in out                             # each fp16 copy
    assert "DOES NOT FIT: chat-c" in out and "short by" in out
    assert "share_weights is false" in out


def test_config_error_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {}\ngpus: []\n")
    assert main(["plan", str(bad)]) == 2
    assert f"{bad}: models" in capsys.readouterr().err


def test_console_script():
    script = Path(sys.executable).parent / "colocate"
    assert script.exists(), "the colocate console script is missing: pip install -e '.[dev]'"
    result = subprocess.run([str(script), "plan", str(EXAMPLES / "t4-llama2-13b.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cuda:0: capacity" in result.stdout


@pytest.mark.parametrize("name,scheme,per_param", [
    ("a100-3x-llama2-13b.yaml", "int4 g128", "0.531"),          # 0.5 + 2 x 2 bytes / 128
    ("a100-3x-llama2-13b-unshared-fp16.yaml", "float16", "2.000"),
])
def test_plan_prints_bytes_per_linear_parameter(capsys, name, scheme, per_param):
    _, out, _ = plan(capsys, name)
    row = next(line for line in out.splitlines() if line.strip().startswith("llama2-13b ")
               and scheme in line)
    assert per_param in row.split()
