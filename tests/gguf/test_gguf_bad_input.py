"""GGUF files that cannot be served as asked: each error names the file and the
tensor or key, at load and, where the header shows it, in `colocate plan`."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import yaml

from colocate import LLM, SamplingParams
from colocate.config import ConfigError, load_config
from colocate.quant.loading import load_model
from colocate.quant.linear import Int4Linear, Int8Linear
from tests.gguf.tiny_gguf import write_tiny_gguf


def plan(tmp_path, model: dict) -> subprocess.CompletedProcess:
    cfg = {"models": {"m": model},
           "gpus": [{"device": "cpu", "memory": "8GiB", "services": [
               {"name": "s", "model": "m", "port": 50999, "max_model_len": 256,
                "kv_cache": {"tokens": 256}, "tenants": [{"name": "t", "token_env": "T"}]}]}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-c", "import sys; from colocate.cli import main; "
                           "sys.exit(main())", "plan", str(path)], capture_output=True,
                          text=True, env={"T": "x", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("linear_type, module, group", [
    ("Q4_0", Int4Linear, 32), ("Q4_1", Int4Linear, 32), ("Q8_0", Int8Linear, 32)])
def test_each_native_type_loads_as_stored(tmp_path, linear_type, module, group):
    path = write_tiny_gguf(tmp_path / "m.gguf", linear_type)
    llm = LLM(str(path))
    lin = llm.model.model.layers[1].mlp.down_proj
    assert isinstance(lin, module) and lin.group_size == group
    # ignore_eos: an unseeded sample of random weights may draw EOS first.
    assert len(llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_another_architecture_names_the_key(tmp_path):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf: general\.architecture='qwen2' is not "
                                         r"supported"):
        LLM(str(path))
    result = plan(tmp_path, {"path": str(path)})
    assert result.returncode != 0 and "general.architecture='qwen2'" in result.stdout + result.stderr


def test_truncated_file_names_the_tensor(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated: tensor 'blk\.\d+\.[a-z_]+\."
                                         r"weight' ends at byte"):
        load_model(cut)
    result = plan(tmp_path, {"path": str(cut)})
    assert result.returncode != 0 and "truncated: tensor" in result.stdout + result.stderr


def test_shape_that_disagrees_with_the_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path / "bad.gguf", wrong_shape="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'blk\.1\.ffn_up\.weight' has shape "
                                         r"\(160, 64\), expected \(128, 64\)"):
        LLM(str(path))


def test_unsupported_type_kept_native_is_an_error(tmp_path, caplog):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", odd_type=("blk.1.ffn_down.weight", "Q5_0"))
    with pytest.raises(ValueError, match=r"mixed\.gguf: tensor 'blk\.1\.ffn_down\.weight' is "
                                         r"Q5_0, which cannot be kept as stored"):
        LLM(str(path), quantization="gguf")
    result = plan(tmp_path, {"path": str(path), "quantization": "gguf"})
    assert result.returncode != 0 and "is Q5_0" in result.stdout + result.stderr
    # As stored by default: the load dequantizes, and says so.
    with caplog.at_level(logging.INFO):
        llm = LLM(str(path))
    assert "blk.1.ffn_down.weight is Q5_0, dequantized" in caplog.text
    assert type(llm.model.model.layers[1].mlp.down_proj).__name__ == "Linear"


def test_a_file_that_is_not_gguf(tmp_path):
    text = tmp_path / "model.bin"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file.*HF checkpoint directory.*or a "
                                         r"\.gguf file"):
        LLM(str(text))
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"m": {"path": str(text)}}, "gpus": [
        {"device": "cpu", "services": [{"name": "s", "model": "m", "port": 50998,
                                        "tenants": [{"name": "t", "token_env": "T"}]}]}]}))
    with pytest.raises(ConfigError, match=r"models\.m\.path.*not a GGUF file"):
        load_config(cfg, {"T": "x"})


def test_int4_group_that_does_not_divide_a_layer_is_caught_by_the_plan(tmp_path, smollm2_gguf):
    # SmolLM2's hidden size is 576 = 4.5 x 128.
    result = plan(tmp_path, {"path": str(smollm2_gguf), "quantization": "int4",
                             "quant_group_size": 128})
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "quant_group_size=128 does not divide a layer's input size 576" in out
    ok = plan(tmp_path, {"path": str(smollm2_gguf), "quantization": "int4",
                         "quant_group_size": 64})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "int4 g32 (as stored)" in plan(tmp_path, {"path": str(smollm2_gguf)}).stdout
