"""The driver's decisions, mostly without Ray: the default config, demo tokens,
preset checkpoints, thread shares, and a refusal that reaches the operator."""
from __future__ import annotations

import dataclasses

import pytest

from colocate.config import load_config
from colocate.cluster import deploy
from colocate.cluster.supervisor import (DeploymentError, default_torch_threads,
                                         preset_checkpoint)
from tests.deployment.helpers import cpu_deployment


def _shape(config):
    return {"models": dict(config.models), "gpus": config.gpus}


def test_embedded_default_equals_the_repository_file(tmp_path):
    repo_copy = deploy.default_config_path()
    assert repo_copy.name == deploy.DEFAULT_CONFIG_NAME and repo_copy.is_file()
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text(deploy.EMBEDDED_DEFAULT_CONFIG)
    assert (_shape(load_config(embedded, check_env=False))
            == _shape(load_config(repo_copy, check_env=False)))


def test_demo_tokens_fill_only_unset_variables():
    config, generated = deploy.load_with_demo_tokens(
        deploy.default_config_path(), env={"TENANT_B_TOKEN": "mine"})
    assert sorted(generated) == ["TENANT_A_TOKEN", "TENANT_C_TOKEN"]
    assert len(set(generated.values())) == 2
    tokens = {t.token_env: t.token for _, s in config.services() for t in s.tenants}
    assert tokens == {**generated, "TENANT_B_TOKEN": "mine"}


def test_tokens_never_show_in_a_printed_launch():
    from colocate.service.runtime import ServiceLaunch

    fields = {f.name: f for f in dataclasses.fields(ServiceLaunch)}
    assert fields["tenants"].repr is False


def test_preset_checkpoint_is_written_once(tmp_path):
    path = preset_checkpoint("tiny", tmp_path)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert preset_checkpoint("tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]     # no scratch left behind


@pytest.mark.parametrize("services, cores, threads", [(3, 2, 1), (2, 8, 4), (1, 2, 2)])
def test_torch_threads_share_the_cores(services, cores, threads):
    assert default_torch_threads(services, cores) == threads


def test_a_deployment_that_does_not_fit_names_the_service(ray_session, tmp_path,
                                                          tiny_model_dir):
    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["fits", "too-big"])
    gpu = config.gpus[0]
    # Room for the supervisor and one service (about 256 MiB runtime each), not two.
    config = dataclasses.replace(config, gpus=(dataclasses.replace(gpu, memory=700 * 2**20),))
    with pytest.raises(DeploymentError, match=r"too-big refused.*short by"):
        deploy.Deployment(config)


def test_serve_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {}\n")
    assert deploy.run_serve(str(bad)) == 2
    assert "colocate serve:" in capsys.readouterr().err
