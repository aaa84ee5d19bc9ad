"""Zero-copy weights, measured: the services' PSS with one shared copy of the `small`
preset (about 420 MiB fp32) against one copy per service (share_weights: false).

PSS splits each shared page among the processes mapping it, so three services on one
copy add up to one copy's worth of weight pages, and on three copies to three."""
from __future__ import annotations

import pytest

from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import cpu_deployment, stream_tokens, token_of

NAMES = ["pss-a", "pss-b", "pss-c"]
MiB = 2**20


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    # Written by the first deployment's supervisor, reused by the second.
    return str(tmp_path_factory.mktemp("presets"))


def measure(tmp_path, preset_dir: str, share_weights: bool) -> dict:
    config = cpu_deployment(tmp_path, "preset:small", NAMES, share_weights=share_weights,
                            kv_tokens=64)
    with Deployment(config, torch_threads=1, preset_dir=preset_dir) as dep:
        for e in dep.wait_ready(timeout=240):
            # A forward pass reads every weight page (the lm_head is the tied
            # embedding), so every service has all of them mapped in.
            stream_tokens(e.target, token_of(e.service), "Hello", max_tokens=2)
        (device,) = dep.status()
    pss = {s["name"]: s["stats"].pss_bytes for s in device["services"]}
    return dict(pss=pss, total=sum(pss.values()), copies=device["weight_copies"],
                weight_bytes=device["weight_store_bytes"] // device["weight_copies"])


def test_shared_weights_are_mapped_once(ray_session, tmp_path, preset_dir):
    shared = measure(tmp_path / "shared", preset_dir, share_weights=True)
    unshared = measure(tmp_path / "unshared", preset_dir, share_weights=False)
    weights = shared["weight_bytes"]
    print(f"\nweights {weights / MiB:.0f} MiB; PSS per service, shared: "
          + ", ".join(f"{v / MiB:.0f}" for v in shared["pss"].values())
          + f" MiB (total {shared['total'] / MiB:.0f}); unshared: "
          + ", ".join(f"{v / MiB:.0f}" for v in unshared["pss"].values())
          + f" MiB (total {unshared['total'] / MiB:.0f})")
    assert (shared["copies"], unshared["copies"]) == (1, 3)
    assert weights > 400 * MiB
    # Two copies fewer; allow a quarter of a copy for noise in the rest of the process.
    saved = unshared["total"] - shared["total"]
    assert saved > 1.75 * weights, (saved / MiB, weights / MiB)
