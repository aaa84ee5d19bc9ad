"""CUDA IPC bookkeeping of the weight store, with a fake reduction (no GPU here).

The fake stands in for torch's reduce_tensor: each call is one send with its own
reference counter, as torch's are. The tests check what the store promises: one
reduction per consumer (never one shared by several), and the exporter's buffer kept
until the model is released AND every consumer has ended. bench/gpu_check.py runs the
same path with real IPC handles on a GPU.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from colocate.memory import weight_store
from colocate.memory.cuda_ipc import IpcExports
from colocate.memory.shm_tensors import pack
from colocate.memory.weight_store import WeightStore, attach


class FakeReduce:
    """Records each send; the 'arguments' name the buffer and the send's counter."""

    def __init__(self):
        self.sends: list[int] = []

    def __call__(self, buffer: torch.Tensor) -> tuple:
        self.sends.append(buffer.data_ptr())
        return ("fake-ipc", buffer.data_ptr(), len(self.sends))


def _buffer_ref(exports: IpcExports, name: str) -> weakref.ref:
    return weakref.ref(exports._exports[name].buffer)


def test_each_lease_is_its_own_reduction():
    reduce = FakeReduce()
    exports = IpcExports(reduce)
    exports.add("m", torch.zeros(64, dtype=torch.uint8))
    (a, args_a), (b, args_b) = exports.lease("m"), exports.lease("m")
    assert len(reduce.sends) == 2 and a != b and args_a != args_b
    assert exports.leases("m") == 2


def test_buffer_outlives_release_until_the_last_consumer_ends():
    exports = IpcExports(FakeReduce())
    exports.add("m", torch.zeros(64, dtype=torch.uint8))
    ref = _buffer_ref(exports, "m")
    first, _ = exports.lease("m")
    second, _ = exports.lease("m")
    exports.end("m", first)                     # one service exits: nothing is freed
    exports.retire("m")                         # the store releases the model
    gc.collect()
    assert ref() is not None and exports.held() == ["m"] and exports.held_bytes() == 64
    with pytest.raises(KeyError, match="released"):
        exports.lease("m")                      # a released model gets no new consumers
    exports.end("m", second)
    exports.end("m", second)                    # ending twice is harmless
    gc.collect()
    assert ref() is None and exports.held() == []


def test_buffer_of_an_unconsumed_model_goes_at_release():
    exports = IpcExports(FakeReduce())
    exports.add("m", torch.zeros(8, dtype=torch.uint8))
    ref = _buffer_ref(exports, "m")
    exports.retire("m")
    gc.collect()
    assert ref() is None


@pytest.fixture
def fake_cuda_store(monkeypatch):
    """A 'cuda:0' store whose device buffer is a CPU tensor and whose IPC is FakeReduce."""
    def publish_on_cpu(state, specs, size, device):
        flat = torch.zeros(size, dtype=torch.uint8)
        pack(state, specs, flat)
        return flat
    monkeypatch.setattr(weight_store, "_cuda_publish", publish_on_cpu)
    reduce = FakeReduce()
    store = WeightStore("cuda:0", reduce=reduce)
    yield store, reduce
    store.close()


def test_store_shares_once_per_consumer_and_restart(fake_cuda_store, tiny_model_dir):
    store, reduce = fake_cuda_store
    published = store.publish("tiny", tiny_model_dir)
    assert published.cuda_ipc is None and reduce.sends == []      # publishing sends nothing
    services = [store.share("tiny") for _ in range(3)]            # three services
    assert len(reduce.sends) == 3
    assert len({s.lease for s in services}) == 3 and len({s.cuda_ipc for s in services}) == 3
    assert all(s.token == published.token for s in services)     # one copy, one cache key
    # A restart: the old process's lease ends, the new process gets a new one.
    store.end_share(services[0])
    restarted = store.share("tiny")
    assert restarted.lease not in {s.lease for s in services} and len(reduce.sends) == 4
    assert store.cuda.leases("tiny") == 3

    ref = _buffer_ref(store.cuda, "tiny")
    store.release("tiny")
    gc.collect()
    assert ref() is not None                    # three services still map it
    for s in (services[1], services[2], restarted):
        store.end_share(s)
    gc.collect()
    assert ref() is None and store.cuda.held() == []


def test_published_cuda_handle_attaches_only_in_the_publisher(fake_cuda_store, tiny_model_dir):
    store, _ = fake_cuda_store
    published = store.publish("tiny", tiny_model_dir)
    assert published.token in weight_store._ATTACHED    # this process: the cached views
    weight_store.detach(published)
    with pytest.raises(ValueError, match="share"):
        attach(published)                       # elsewhere it must come from share()


def test_cpu_share_is_the_published_handle(tiny_model_dir):
    with WeightStore("cpu") as store:
        handle = store.publish("tiny", tiny_model_dir)
        assert store.share("tiny") is handle and handle.lease is None
        store.end_share(handle)                 # a no-op on CPU
