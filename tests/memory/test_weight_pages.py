"""A sleeping CPU engine gives back its model's weight pages too, where the store keeps
the copy on disk (WeightStore.publish(on_disk=True), memory/weight_pages.py): the file's
page-cache residency falls to almost nothing once no process maps it, and the engine
wakes with the same greedy tokens. Residency is read with mincore(2) over a private
mapping of the file in this process, which faults nothing in."""
from __future__ import annotations

import ctypes
import mmap
import os

import torch

from colocate.engine.config import EngineConfig
from colocate.memory.weight_store import WeightStore, attach, detach, disk_root
from colocate.sampling_params import SamplingParams
from colocate.worker.engine_factory import build_engine

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: str) -> float:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)   # writable: for its address
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) / pages
    finally:
        del addr
        mm.close()


def greedy(engine, prompt) -> list[int]:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [t for out in engine.stream(prompt, params) for t in out.new_token_ids]


def test_a_sleeping_engine_gives_back_its_disk_backed_weights(tiny_model_dir):
    with WeightStore("cpu") as store:
        handle = store.publish("tiny", tiny_model_dir, "float32", on_disk=True)
        assert os.path.dirname(os.path.dirname(handle.path)) == str(disk_root())
        model = attach(handle)
        engine = build_engine(model, model.config, None,
                              EngineConfig(max_model_len=64, kv_cache_tokens=64,
                                           max_num_seqs=2, max_num_batched_tokens=64),
                              dtype=torch.float32, device=torch.device("cpu"))
        before = greedy(engine, [1, 15, 200, 33, 7])
        assert resident_fraction(handle.path) > 0.9            # in use: all in memory
        engine.sleep()
        assert resident_fraction(handle.path) < 0.1            # given back
        assert greedy(engine, [1, 15, 200, 33, 7]) == before   # woken: read back
        assert resident_fraction(handle.path) > 0.9
        del engine, model
        detach(handle)
    assert not os.path.exists(handle.path)


def test_weights_in_dev_shm_are_the_default(tiny_model_dir, tmp_path):
    with WeightStore("cpu", root=tmp_path) as store:
        handle = store.publish("tiny", tiny_model_dir, "float32")
        assert os.path.dirname(os.path.dirname(handle.path)) == str(tmp_path)


def test_a_model_that_may_sleep_is_published_on_disk(tiny_model_dir, tmp_path):
    """The supervisor's launch plan: a model some service may sleep away from goes to
    disk, the others stay in /dev/shm (the store's root)."""
    from colocate.cluster.launch import prepare_launches
    from colocate.memory.sizing import ServiceDemand
    from tests.deployment.helpers import cpu_deployment

    for sleepy, where in ((True, str(disk_root())), (False, str(tmp_path / "shm"))):
        config = cpu_deployment(tmp_path / f"cfg-{sleepy}", str(tiny_model_dir), ["a", "b"],
                                per_service={"a": {"sleep_after_idle": "2s"}} if sleepy else {})
        (gpu,) = config.gpus
        demands = {s.name: ServiceDemand(s.name, "m", "auto", 4096, 256, 256 * 4096, 0, 0, 0)
                   for s in gpu.services}
        (tmp_path / "shm").mkdir(exist_ok=True)
        with WeightStore("cpu", root=tmp_path / "shm") as store:
            launches = prepare_launches(gpu, config, store, demands, device="cpu",
                                        host="127.0.0.1", torch_threads=1, tenants={})
            paths = {launch.weights.path for launch in launches}
            assert len(paths) == 1                               # one shared copy
            assert os.path.dirname(os.path.dirname(paths.pop())) == where
