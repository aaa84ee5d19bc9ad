"""WeightStore / attach: one shared, read-only copy of the weights per device (CPU path)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from colocate.memory import weight_store
from colocate.memory.weight_store import (WeightStore, attach, detach, mapped_bytes,
                                          remove_stale_stores)
from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches
from colocate.quant.loading import load_model

# A service stand-in: attach the pickled handle, touch every weight (so its pages
# count in PSS), report a checksum, then hold the mapping until stdin closes.
# With "write" it instead writes through a parameter, bypassing autograd.
CHILD = r"""
import json, pickle, sys
import torch
from colocate.memory.weight_store import attach
with open(sys.argv[1], "rb") as f:
    model = attach(pickle.load(f))
if sys.argv[2] == "write":
    with torch.no_grad():
        model.model.norm.weight.fill_(7.0)
    print("written", flush=True)
    sys.exit(0)
checksum = sum(p.double().sum().item() for p in model.parameters())
print(json.dumps({"checksum": checksum}), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def store():
    s = WeightStore("cpu")
    yield s
    s.close()


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from colocate.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("small"), preset="small", seed=0)


def _spawn(handle, mode: str, tmp_path: Path, n: int = 1) -> list[subprocess.Popen]:
    handle_file = tmp_path / "handle.pkl"
    handle_file.write_bytes(pickle.dumps(handle))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return [subprocess.Popen([sys.executable, "-c", CHILD, str(handle_file), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(n)]


def _mapping_range(path: str) -> tuple[int, int]:
    """[start, end) of this process's mapping of `path`, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                start, end = line.split()[0].split("-")
                return int(start, 16), int(end, 16)
    raise AssertionError(f"{path} is not mapped")


def _weight_map_use(pid: int, path: str) -> tuple[int, int]:
    """(PSS, private bytes) of process `pid`'s mapping of `path`."""
    maps = [m for m in psutil.Process(pid).memory_maps(grouped=True) if m.path.startswith(path)]
    assert maps, f"process {pid} does not map {path}"
    return sum(m.pss for m in maps), sum(m.private_clean + m.private_dirty for m in maps)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill one sequence in one step; (T,) token ids -> (T, vocab) logits."""
    T, block_size = ids.numel(), 16
    blocks = -(-T // block_size)
    caches = allocate_kv_caches(model.config, blocks + 1, block_size)      # block 0: null
    table = torch.arange(1, blocks + 1)
    pos = torch.arange(T)
    meta = AttentionMetadata(slot_mapping=table[pos // block_size] * block_size + pos % block_size,
                             query_start_loc=[0, T], seq_lens=[T],
                             block_tables=table[None], block_size=block_size)
    return model.compute_logits(model(ids, pos, caches, meta))


def test_attached_model_equals_loaded_model(store, tiny_model_dir):
    model = attach(store.publish("tiny", tiny_model_dir))
    ref = load_model(tiny_model_dir)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in ours       # the fused layout
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (21,), generator=gen)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


def test_parameters_are_views_of_the_shared_file(store, tiny_model_dir):
    handle = store.publish("tiny", tiny_model_dir)
    a, b = attach(handle), attach(handle)
    start, end = _mapping_range(handle.path)
    assert end - start >= handle.nbytes
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert start <= pa.data_ptr() and pa.data_ptr() + pa.nbytes <= end, name
        assert pa.data_ptr() % 64 == 0, name
        assert pa.data_ptr() == pb.data_ptr(), name       # two models, one mapping
    assert mapped_bytes() >= handle.tensor_bytes == a.weight_bytes()
    detach(handle)


def test_inplace_write_to_a_parameter_raises(store, tiny_model_dir):
    model = attach(store.publish("tiny", tiny_model_dir))
    weight = model.model.norm.weight
    before = weight.clone()
    with pytest.raises(RuntimeError):
        weight.add_(1.0)
    assert torch.equal(weight, before)


def test_write_bypassing_autograd_kills_the_writer_not_the_weights(store, tiny_model_dir, tmp_path):
    handle = store.publish("tiny", tiny_model_dir)
    before = Path(handle.path).read_bytes()
    (child,) = _spawn(handle, "write", tmp_path)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGSEGV and "written" not in out
    assert Path(handle.path).read_bytes() == before


def test_processes_share_one_copy(store, small_model_dir, tmp_path):
    """Three services of the `small` preset (418 MiB fp32) hold one copy between them."""
    model_dir = small_model_dir
    handle = store.publish("small", model_dir)
    expected = sum(p.double().sum().item() for p in load_model(model_dir).parameters())
    children = _spawn(handle, "read", tmp_path, n=3)
    try:
        reports = [json.loads(c.stdout.readline()) for c in children]
        assert all(r["checksum"] == expected for r in reports)
        # Measured only once every child has touched every page.
        use = [_weight_map_use(c.pid, handle.path) for c in children]
    finally:
        for c in children:
            c.stdin.close()
            c.wait(timeout=60)
    assert all(private == 0 for _, private in use)      # no page is any one child's own
    total_pss = sum(pss for pss, _ in use)
    assert total_pss <= 1.1 * handle.nbytes             # private copies would be 3x


def test_publish_twice_loads_once(store, tiny_model_dir, monkeypatch):
    reads = []
    real = weight_store.read_hf_tensors
    monkeypatch.setattr(weight_store, "read_hf_tensors", lambda *a: reads.append(a) or real(*a))
    first = store.publish("tiny", tiny_model_dir)
    assert store.publish("tiny", tiny_model_dir) is first
    assert len(reads) == 1 and store.models() == ["tiny"]
    with pytest.raises(ValueError, match="already published"):
        store.publish("tiny", tiny_model_dir, dtype="bfloat16")


def test_bytes_and_handle(store, tiny_model_dir):
    h32 = store.publish("a", tiny_model_dir)
    h16 = store.publish("b", tiny_model_dir, dtype="bfloat16")
    assert store.bytes_of("a") == h32.nbytes == os.path.getsize(h32.path)
    assert h16.tensor_bytes * 2 == h32.tensor_bytes == load_model(tiny_model_dir).weight_bytes()
    assert store.total_bytes() == h32.nbytes + h16.nbytes
    assert all(s.offset % 64 == 0 for s in h16.specs)
    assert pickle.loads(pickle.dumps(h32)) == h32
    assert len(pickle.dumps(h32)) < 16_000                # paths and shapes, never data
    assert attach(h16).model.norm.weight.dtype == torch.bfloat16


def test_release_and_close_remove_the_files(tiny_model_dir):
    store = WeightStore("cpu")
    a, b = store.publish("a", tiny_model_dir), store.publish("b", tiny_model_dir)
    assert Path(a.path).parent == store.dir and store.dir.parent == Path("/dev/shm")
    store.release("a")
    assert not Path(a.path).exists() and Path(b.path).exists()
    with pytest.raises(KeyError):
        store.bytes_of("a")
    store.close()
    assert not store.dir.exists()


def test_two_stores_do_not_collide(tiny_model_dir):
    with WeightStore("cpu") as one, WeightStore("cpu") as two:
        assert one.publish("m", tiny_model_dir).path != two.publish("m", tiny_model_dir).path


def test_files_removed_when_the_supervisor_exits_without_close(tiny_model_dir):
    script = ("import sys; from colocate.memory.weight_store import WeightStore\n"
              "s = WeightStore('cpu'); s.publish('m', sys.argv[1]); print(s.dir)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert not Path(out.strip()).exists()


def test_new_store_removes_directories_of_dead_stores(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"{weight_store.DIR_PREFIX}{dead}-abc"
    live = tmp_path / f"{weight_store.DIR_PREFIX}{os.getpid()}-abc"
    for d in (stale, live):
        d.mkdir()
        (d / "m.bin").write_bytes(b"x")
    with WeightStore("cpu", root=tmp_path):
        assert not stale.exists() and live.exists()
    assert remove_stale_stores(tmp_path) == []
