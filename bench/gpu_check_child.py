"""A process gpu_check starts: a service (ServiceRuntime, no Ray) or a bare weight mapper.

    python bench/gpu_check_child.py service LAUNCH.pkl    # serve; stdin: metrics | stop
    python bench/gpu_check_child.py weights HANDLE.pkl    # map; stdin: sum | stop
    python bench/gpu_check_child.py hf SPEC.pkl           # HF peer; stdin: run L N | stop

It prints one JSON line when ready ({"pid", "port"} or {"pid", "checksum"}) and one per
command, so the parent drives it over pipes. A service's metrics come back pickled
and base64-encoded (a ServiceReport).
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


def checksum(model) -> float:
    return sum(p.double().sum().item() for p in model.parameters())


def serve(launch_file: str) -> None:
    from colocate.service.runtime import ServiceRuntime

    runtime = ServiceRuntime(pickle.loads(Path(launch_file).read_bytes()))
    print(json.dumps({"pid": os.getpid(), "port": runtime.port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "metrics":
            blob = base64.b64encode(pickle.dumps(runtime.metrics())).decode()
            print(json.dumps({"metrics": blob}), flush=True)
        elif line.strip() == "stop":
            break
    runtime.shutdown(grace=1.0)


def map_weights(handle_file: str) -> None:
    from colocate.memory.weight_store import attach

    model = attach(pickle.loads(Path(handle_file).read_bytes()))
    print(json.dumps({"pid": os.getpid(), "checksum": checksum(model)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "sum":
            print(json.dumps({"checksum": checksum(model)}), flush=True)
        elif line.strip() == "stop":
            break


def hf_peer(spec_file: str) -> None:
    """HF transformers as one service's peer: the same config, random weights, on the
    given device; stdin "run PROMPT_LEN NEW_TOKENS" -> {"ttft_ms", "e2e_ms"}."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = pickle.loads(Path(spec_file).read_bytes())
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    config = AutoConfig.from_pretrained(spec["config_dir"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    print(json.dumps({"pid": os.getpid()}), flush=True)

    def timed(ids, n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["run"]:
            plen, new = int(words[1]), int(words[2])
            ids = torch.arange(2, 2 + plen, device=device)[None]
            ttft = timed(ids, 1)
            print(json.dumps({"ttft_ms": ttft, "e2e_ms": timed(ids, new)}), flush=True)
        elif words[:1] == ["stop"]:
            break


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    {"service": serve, "weights": map_weights, "hf": hf_peer}[mode](arg)
