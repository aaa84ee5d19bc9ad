"""A live change through the real supervisor, Ray and gRPC: one service streams without
a break while another is removed, a third restarted with a new budget and a fourth
added; a change that does not fit is refused with nothing changed."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from colocate.client import Client
from colocate.cluster.apply import run_apply
from colocate.cluster.deploy import Deployment
from colocate.cluster.supervisor import DeploymentError
from tests.deployment.helpers import cpu_deployment, stream_tokens, token_of

PROMPT, GREEDY = [1, 50, 60, 70, 80], dict(max_tokens=64, temperature=0.0)


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    config = cpu_deployment(tmp_path_factory.mktemp("apply"), str(tiny_model_dir),
                            ["steady", "leaving", "resized"], memory="4GiB")
    with Deployment(config, torch_threads=1, health_interval_s=0.5) as dep:
        dep.wait_ready(timeout=180)
        yield dep


def changed(deployment, tmp_path, tiny_model_dir, names, per_service):
    """A new YAML for the running deployment: kept services keep their ports."""
    config = cpu_deployment(tmp_path, str(tiny_model_dir), names, memory="4GiB",
                            per_service=per_service,
                            tokens={n: token_of(n) for n in names})
    ports = {s.name: s.port for _, s in deployment.config.services()}
    gpu = config.gpus[0]
    services = tuple(dataclasses.replace(s, port=ports.get(s.name, s.port))
                     for s in gpu.services)
    return dataclasses.replace(config, gpus=(dataclasses.replace(gpu, services=services),))


def snapshot(deployment) -> tuple[list[str], list]:
    (device,) = deployment.status(with_stats=False)
    return [s["name"] for s in device["services"]], device["ledger"]


def test_a_change_that_does_not_fit_changes_nothing(deployment, tmp_path, tiny_model_dir):
    before = snapshot(deployment)
    too_big = changed(deployment, tmp_path, tiny_model_dir, ["steady", "leaving", "resized"],
                      {"resized": {"kv_cache": {"budget": "8GiB"}}})
    with pytest.raises(DeploymentError, match="the new plan does not fit: service resized"):
        deployment.apply(too_big)
    assert snapshot(deployment) == before


def test_the_cli_finds_the_deployment_and_refuses_what_does_not_fit(
        deployment, tmp_path, tiny_model_dir, monkeypatch, capsys):
    names = ["steady", "leaving", "resized"]
    before = snapshot(deployment)
    too_big = cpu_deployment(tmp_path, str(tiny_model_dir), names, memory="4GiB",
                             per_service={"resized": {"kv_cache": {"budget": "8GiB"}}})
    for i, name in enumerate(names):       # the YAML's tokens, from the environment
        monkeypatch.setenv(f"TOKEN_{i}", token_of(name))
    # Ray is connected in this process: run_apply uses it and leaves it connected.
    assert run_apply(too_big.source, None, deployment.name) == 1
    err = capsys.readouterr().err
    assert err.startswith("colocate apply: refused, nothing changed: cpu: the new plan "
                          "does not fit: service resized"), err
    assert snapshot(deployment) == before
    assert run_apply(too_big.source, None, "no-such-deployment") == 1
    assert "no deployment 'no-such-deployment'" in capsys.readouterr().err


def test_add_remove_and_resize_while_a_neighbour_streams(deployment, tmp_path, tiny_model_dir,
                                                        targets):
    reference = stream_tokens(targets["steady"], token_of("steady"), PROMPT, **GREEDY)
    new = changed(deployment, tmp_path, tiny_model_dir, ["steady", "resized", "joining"],
                  {"resized": {"kv_cache": {"tokens": 512}}})
    applied, streams, errors = threading.Event(), [], []

    def stream_until_applied():
        # Back to back, from before the change until after it: every one whole.
        try:
            with Client(targets["steady"], token_of("steady"), timeout=120) as client:
                while not applied.is_set() or len(streams) < 2:
                    streams.append([t for d in client.generate(PROMPT, **GREEDY)
                                    for t in d.token_ids])
        except Exception as exc:       # noqa: BLE001  (reported below)
            errors.append(exc)

    thread = threading.Thread(target=stream_until_applied)
    thread.start()
    try:
        lines = deployment.apply(new)
    finally:
        applied.set()
        thread.join(120)
    assert lines == ["cpu: add joining; remove leaving; restart resized"]
    assert not errors and len(streams) >= 2 and all(s == reference for s in streams)
    names, ledger = snapshot(deployment)
    assert names == ["steady", "resized", "joining"]
    holders = {service for _, _, service in ledger if service}
    assert holders == {"steady", "resized", "joining"}       # leaving's budget went back
    rows = {s["name"]: s for s in deployment.status(with_stats=False)[0]["services"]}
    assert rows["resized"]["kv_tokens"] == 512 and rows["steady"]["restarts"] == 0
    targets = deployment.targets()
    for name in ("resized", "joining"):
        with Client(targets[name], token_of(name)) as client:
            assert client.model_info().kv_cache_tokens == rows[name]["kv_tokens"]
        assert stream_tokens(targets[name], token_of(name), PROMPT, **GREEDY) == reference
