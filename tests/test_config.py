"""Deployment YAML: the examples load, sizes parse, and every error names file and key."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from colocate.config import ConfigError, load_config
from colocate.sizes import format_size, parse_size

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
LLAMA_13B = REPO / "deploy" / "models" / "llama-2-13b-chat"
ENV = {"TOK_A": "secret-a", "TOK_B": "secret-b"}


def base_config() -> dict:
    """A valid two-device deployment; tests break one thing in a copy of it."""
    service = {"name": "svc-a", "model": "m", "port": 50051, "max_model_len": 1024,
               "kv_cache": {"dtype": "int8", "budget": "1GiB"},
               "tenants": [{"name": "t-a", "token_env": "TOK_A"}]}
    return {
        "models": {"m": {"path": "model", "dtype": "float16", "quantization": "int4"}},
        "gpus": [
            {"device": "cpu", "metrics_port": 9400,
             "services": [service,
                          {**service, "name": "svc-b", "port": 50052,
                           "kv_cache": {"tokens": 4096},
                           "tenants": [{"name": "t-b", "token_env": "TOK_B"}]}]},
            {"device": "cuda:0", "memory": "24GB", "headroom": "512MiB",
             "share_weights": False,
             "services": [{**service, "name": "svc-c", "port": 50053}]},
        ],
    }


def write(tmp_path: Path, data: dict | str, with_model: bool = True) -> Path:
    if with_model:
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text((LLAMA_13B / "config.json").read_text())
    path = tmp_path / "deploy.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load_error(tmp_path: Path, data: dict | str, **kw) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=kw.pop("env", ENV), **kw)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every error names the file
    return message


# ---- valid files -------------------------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(example):
    config = load_config(example, check_env=False)
    assert config.gpus and all(gpu.services for gpu in config.gpus)
    for _, service in config.services():
        assert service.model in config.models


def test_examples_cover_the_brief():
    names = {p.name for p in EXAMPLES}
    assert {"cpu-3x-smollm2.yaml", "a100-3x-llama2-13b.yaml", "rtx4090-llama2-13b.yaml",
            "l4-llama2-13b.yaml", "t4-llama2-13b.yaml",
            "a100-3x-llama2-13b-unshared-fp16.yaml"} <= names


def test_base_config_values_and_defaults(tmp_path):
    config = load_config(write(tmp_path, base_config()), env=ENV)
    model = config.models["m"]
    assert model.path == str(tmp_path / "model")   # relative to the YAML file
    assert (model.dtype, model.quantization, model.quant_group_size) == ("float16", "int4", 128)
    cpu, cuda = config.gpus
    assert cpu.device == "cpu" and cpu.memory is None and cpu.headroom is None
    assert cpu.share_weights is True and cpu.metrics_port == 9400
    assert cuda.memory == 24 * 10**9 and cuda.headroom == 512 * 2**20
    assert cuda.share_weights is False
    a, b = cpu.services
    assert a.kv_cache.budget_bytes == 2**30 and a.kv_cache.tokens is None
    assert b.kv_cache.tokens == 4096 and b.kv_cache.budget_bytes is None
    assert b.kv_cache.dtype == "auto"
    assert (a.max_num_seqs, a.max_num_batched_tokens, a.max_queued_requests) == (64, 2048, 256)
    assert a.tenants[0].token == "secret-a"
    assert "secret-a" not in repr(config)  # tokens never show up in logs


def test_relative_path_does_not_depend_on_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, base_config())
    monkeypatch.chdir(REPO)
    assert load_config(path, env=ENV).models["m"].path == str(tmp_path / "model")


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, base_config()), env=ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gpus[0].services[0].port = 1
    with pytest.raises(TypeError):
        config.models["x"] = config.models["m"]


def test_env_and_path_checks_can_be_skipped(tmp_path):
    data = base_config()
    data["models"]["m"]["path"] = "/nonexistent/model"
    config = load_config(write(tmp_path, data), env={}, check_paths=False, check_env=False)
    assert config.gpus[0].services[0].tenants[0].token is None


def test_preset_path_is_kept(tmp_path):
    data = base_config()
    data["models"]["m"] = {"path": "preset:tiny"}
    model = load_config(write(tmp_path, data), env=ENV).models["m"]
    assert model.preset == "tiny" and model.llama_config().hidden_size > 0


# ---- sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20), ("13.3GB", 13_300_000_000),
    ("1024", 1024), (1024, 1024), ("4 KiB", 4096), ("1.5kib", 1536), ("80GB", 80 * 10**9),
    ("0", 0), ("7B", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["20 GiBs", "lots", "-1GiB", "", "1.2.3GB", True, 1.5, None, -4])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert format_size(20 * 2**30) == "20.0 GiB"
    assert format_size(819_200) == "800.0 KiB"
    assert format_size(12) == "12 B"


# ---- errors: each names the key path and the problem ---------------------------------

def _set(data: dict, path: str, value) -> None:
    """Set data[a][b][0]... from 'a.b.0'; value None deletes the key."""
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    key = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value


S0 = "gpus.0.services.0"
ERRORS = [
    # (where to change, new value, key path expected in the message, problem text)
    ("modles", {}, "modles", "unknown key"),
    (f"{S0}.kv_cache.bugdet", "1GiB", "gpus[0].services[0].kv_cache.bugdet", "did you mean 'budget'"),
    (f"{S0}.tenants.0.tokn_env", "X", "gpus[0].services[0].tenants[0].tokn_env", "unknown key"),
    ("models.m.quant", "int4", "models.m.quant", "unknown key"),
    ("gpus.1.sharing", True, "gpus[1].sharing", "unknown key"),
    (f"{S0}.kv_cache.budget", "20 GiBs", "gpus[0].services[0].kv_cache.budget", "bad size"),
    ("gpus.1.memory", "lots", "gpus[1].memory", "bad size"),
    ("gpus.1.headroom", "-1GiB", "gpus[1].headroom", "bad size"),
    ("models.m.dtype", "float8", "models.m.dtype", "'float8' is not one of"),
    ("models.m.quantization", "int3", "models.m.quantization", "'int3' is not one of"),
    (f"{S0}.kv_cache.dtype", "fp8", "gpus[0].services[0].kv_cache.dtype", "'fp8' is not one of"),
    ("gpus.1.services.0.port", 50051, "gpus[1].services[0].port", "duplicate port 50051"),
    ("gpus.1.metrics_port", 50052, "gpus[1].metrics_port", "duplicate port 50052"),
    (f"{S0}.http_port", 50052, "gpus[0].services[1].port", "duplicate port 50052"),
    (f"{S0}.http_port", 9400, "gpus[0].services[0].http_port", "duplicate port 9400"),
    (f"{S0}.http_port", "8000", "gpus[0].services[0].http_port", "expected an integer"),
    (f"{S0}.served_model_name", "", "gpus[0].services[0].served_model_name", ""),
    ("gpus.0.services.1.name", "svc-a", "gpus[0].services[1].name", "duplicate service name"),
    (f"{S0}.model", "llama", "gpus[0].services[0].model", "'llama' is not defined"),
    (f"{S0}.port", None, "gpus[0].services[0].port", "missing required key"),
    ("models.m.path", None, "models.m.path", "missing required key"),
    (f"{S0}.port", "50051", "gpus[0].services[0].port", "expected an integer"),
    (f"{S0}.port", 70000, "gpus[0].services[0].port", "out of range"),
    (f"{S0}.max_queued_requests", 0, "gpus[0].services[0].max_queued_requests",
     "0 is out of range; must be >= 1"),
    (f"{S0}.max_model_len", True, "gpus[0].services[0].max_model_len", "expected an integer"),
    ("gpus.1.share_weights", "yes", "gpus[1].share_weights", "expected true or false"),
    ("gpus.0.services", {}, "gpus[0].services", "expected a non-empty list"),
    (f"{S0}.tenants", [], "gpus[0].services[0].tenants", "non-empty list"),
    (f"{S0}.kv_cache", {"budget": "1GiB", "tokens": 10}, "gpus[0].services[0].kv_cache",
     "exactly one of"),
    (f"{S0}.kv_cache", {"dtype": "int8"}, "gpus[0].services[0].kv_cache", "exactly one of"),
    (f"{S0}.kv_cache.budget", "0GiB", "gpus[0].services[0].kv_cache.budget", "greater than zero"),
    (f"{S0}.max_num_batched_tokens", 8, "gpus[0].services[0].max_num_batched_tokens",
     "less than max_num_seqs"),
    ("gpus.1.device", "gpu0", "gpus[1].device", "not 'cpu' or 'cuda:N'"),
    ("gpus.1.device", "cpu", "gpus[1].device", "already listed at gpus[0]"),
    ("models.m.path", "preset:huge", "models.m.path", "unknown preset 'huge'"),
    ("models.m.path", "missing-dir", "models.m.path", "does not exist"),
]


@pytest.mark.parametrize("where, value, key, problem", ERRORS,
                         ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_error_names_key_and_problem(tmp_path, where, value, key, problem):
    data = copy.deepcopy(base_config())
    _set(data, where, value)
    message = load_error(tmp_path, data)
    assert f": {key}: " in message and problem in message, message


def test_http_port_and_served_model_name(tmp_path):
    data = copy.deepcopy(base_config())
    data["gpus"][0]["services"][0].update(http_port=8001, served_model_name="chat-13b")
    a, b = load_config(write(tmp_path, data), env=ENV).gpus[0].services
    assert (a.http_port, a.served_model_name, a.model_names) == (8001, "chat-13b",
                                                                 ("chat-13b", "m"))
    assert (b.http_port, b.model_names) == (None, ("m",))


def test_group_size_only_with_int4(tmp_path):
    data = base_config()
    data["models"]["m"].update(quantization="int8", quant_group_size=64)
    assert "models.m.quant_group_size: only applies to quantization: int4" in load_error(
        tmp_path, data)


def test_missing_token_env(tmp_path):
    message = load_error(tmp_path, base_config(), env={"TOK_A": "x"})
    assert "gpus[0].services[1].tenants[0].token_env" in message and "TOK_B" in message
    # An empty variable is as good as unset: an empty bearer token must not authenticate.
    assert "TOK_A" in load_error(tmp_path, base_config(), env={"TOK_A": "", "TOK_B": "y"})


def test_model_dir_without_config_json(tmp_path):
    data = base_config()
    (tmp_path / "empty").mkdir()
    data["models"]["m"]["path"] = "empty"
    message = load_error(tmp_path, data)
    assert "models.m.path" in message and "has no config.json" in message


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "(top level): expected a mapping" in load_error(tmp_path, "- just\n- a list\n")
    assert "not valid YAML" in load_error(tmp_path, "models: {a: [}\n")
    assert "models: expected a non-empty mapping" in load_error(
        tmp_path, {"models": {}, "gpus": []})


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_13b_config_json_is_llama_2_13b():
    cfg = json.loads((LLAMA_13B / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (
        40, 5120, 40, 40, 13824, 32000)
    assert cfg["torch_dtype"] == "float16" and cfg["architectures"] == ["LlamaForCausalLM"]
