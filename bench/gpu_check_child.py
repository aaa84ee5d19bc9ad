"""A process gpu_check starts: a service (ServiceRuntime, no Ray) or a bare weight mapper.

    python bench/gpu_check_child.py service LAUNCH.pkl    # serve; stdin: metrics | stop
    python bench/gpu_check_child.py weights HANDLE.pkl    # map; stdin: sum | stop

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
    from colocate.serving.service import ServiceRuntime

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


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    {"service": serve, "weights": map_weights}[mode](arg)
