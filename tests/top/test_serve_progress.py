"""What the driver shows of a served deployment's start: each supervisor's loading,
publishing and starting stages, relayed over Ray with the entry's name, counting
what they say (every tensor of the checkpoint, every service started), once each."""
from __future__ import annotations

import ray
from safetensors import safe_open

from colocate import progress
from colocate.cluster.progress_relay import ProgressRelay
from tests.top.conftest import NAMES


def test_supervisor_stages_reach_the_driver_once(deployment, tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys() if "rotary_emb" not in k]
    shown = progress.Recorder()
    relay = ProgressRelay(deployment.supervisors, shown)
    relay.poll()
    relay.poll()                                       # nothing new: nothing again
    totals = shown.totals()
    assert set(totals) == {"cpu: m loading", "cpu: m publishing", "cpu: starting services"}
    n = len(tensors)
    assert totals["cpu: m loading"] == (n, n, sum(t.nbytes for t in tensors))
    assert totals["cpu: starting services"] == (len(NAMES), len(NAMES), 0)
    published = ray.get(deployment.supervisor("cpu").status.remote(False))
    assert totals["cpu: m publishing"][2] <= published["weight_store_bytes"]
    assert len([e for e in shown.events() if e[0] == "begin"]) == 3
