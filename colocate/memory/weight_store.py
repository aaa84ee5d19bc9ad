"""One copy of each model's weights per device, shared zero-copy with every service.

The supervisor's WeightStore.publish() loads a checkpoint once into the model's own
state dict (q/k/v and gate/up already fused, as LlamaForCausalLM uses them), packs
it into one flat buffer and returns a small picklable WeightHandle. A service
process receives the handle (a Ray actor argument) and calls attach(handle), which
maps the buffer and builds a LlamaForCausalLM whose parameters ARE views of it.

CPU: the buffer is a file under <root>/colocate-weights-<pid>-<random>/ (root is
/dev/shm, i.e. RAM), mapped read-only with mmap in every service. CUDA: the buffer is
one device allocation shared by CUDA IPC, one reduction per consumer (cuda_ipc.py).

publish() loads a model once; share() hands one consumer (a service, or one restart
of it) its handle, and end_share() says that consumer is gone. On CPU a share is the
published handle itself; on CUDA it carries that consumer's own IPC lease.

Why a /dev/shm file. Measured on the 2-core CPU box with the `small` preset (fp32,
110M parameters, 418 MiB of weights); PSS (proportional set size) read with psutil
after each child summed every weight, so every page was touched:

  (a) /dev/shm file, mmap ACCESS_READ (this module)
      publish 1.7 s (read safetensors, fuse, write); publish again 0.4 ms, same handle.
      attach in a fresh process: mmap + views 1 ms; building the model on the meta
      device costs 2.2-2.6 s and ~100 MiB once per process (torch imports its
      meta/dynamo machinery on first use; load_model pays the same).
      PSS of the weight mapping: 1 child 418 MiB; 3 children 139 MiB each,
      0 private. Whole-process PSS 718 MiB (1 child), 428 MiB each (3 children).
      A write through a parameter view: SIGSEGV (read-only pages).
  (b) Ray object store (numpy via ray.put, ray.get in actors)
      ray.init 6.4-6.7 s; load + pack + put 2.6 s; get 0.5 ms. Plasma mapping PSS
      209 MiB (1 actor, shared with the store process), 104 MiB each (3 actors),
      0 private: zero copy too. But numpy's read-only flag is only a flag: a torch
      view written in one actor changed the weights another actor read.
  (c) torch share_memory_()
      0.9 s after loading; 83 shm files, one per tensor; 3 spawn children 130 MiB
      torch-shm PSS each. It travels only through torch.multiprocessing's pickler
      (a shared tensor handed to a Ray task arrived unshared: Ray copies the data),
      and the pages are writable by every holder.
  Private copies (load_model per process), 3 children: 646 MiB PSS each, 1942 MiB
      in all, against 1286 MiB for (a).

(a) wins: page-level read-only weights, no Ray object store to size (its default,
30% of RAM, is too small for a 13B model beside the KV pools) or to spill, and a
file we name and delete ourselves.

Cleanup: release()/close() delete the files; a weakref finalizer does the same at
interpreter exit; a new store deletes leftover directories whose owner pid is gone
(a supervisor killed by SIGKILL, as ray.kill does, runs no exit hooks). Deleting a
file that services still map is safe: their mappings stay valid until they exit.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from colocate.memory.cuda_ipc import IpcExports, Reducer, rebuild_cuda_tensor
from colocate.memory.shm_tensors import (TensorSpec, map_file_read_only, pack, plan_layout,
                                         unpack, write_file)
from colocate.model.llama import LlamaForCausalLM
from colocate.model.checkpoint import parse_dtype, read_hf_tensors
from colocate.model.model_config import LlamaConfig
from colocate.memory.weight_pages import WeightPages
from colocate.quant.config import QuantConfig
from colocate.quant.loading import (checkpoint_quant_config, model_over_state_dict,
                                     read_model_state)

DIR_PREFIX = "colocate-weights-"


@dataclass(frozen=True)
class WeightHandle:
    """Everything a service needs to map one published model; small and picklable."""
    model_name: str
    device: str                      # "cpu" or "cuda:N"
    dtype: str                       # e.g. "float16"
    config: dict[str, Any]           # config.json, so services never read the checkpoint
    specs: tuple[TensorSpec, ...]    # the model's state dict, laid out in the buffer
    nbytes: int                      # buffer size, alignment padding included
    token: str                       # unique per publish: same-process attach cache key
    path: str | None = None          # CPU: the shared file
    cuda_ipc: tuple | None = None    # CUDA: one consumer's reduce_tensor() arguments
    lease: str | None = None         # CUDA: which consumer those arguments belong to
    quantization: dict[str, Any] | None = None   # QuantConfig.to_dict(): the module structure

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the tensors themselves, without padding."""
        return sum(s.nbytes for s in self.specs)


# ---- supervisor side ------------------------------------------------------------------

class WeightStore:
    """The models published on one device, each loaded once. Not thread-safe."""

    def __init__(self, device: str = "cpu", root: str | Path | None = None,
                 reduce: Reducer | None = None):
        """reduce: how a CUDA buffer is reduced for one consumer (tests pass a fake)."""
        self.device = str(device)
        self._handles: dict[str, WeightHandle] = {}
        self._sources: dict[str, tuple[Path, torch.dtype, QuantConfig | None]] = {}
        self.cuda = IpcExports(reduce)          # CUDA buffers, held while consumers live
        self.dir: Path | None = None
        self.disk_dir: Path | None = None         # on_disk models' files (_disk_dir)
        if not _is_cuda(self.device):
            root = Path(root) if root is not None else default_root()
            remove_stale_stores(root)
            # The pid in the name lets a later store tell whether this one is still alive.
            self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=root))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    def publish(self, model_name: str, model_path: str | Path,
                dtype: str | torch.dtype = "float32", quantization: str | None = None,
                quant_group_size: int | None = None, read_float=None,
                on_disk: bool = False) -> WeightHandle:
        """Load `model_path` once and share it as `model_name`; a repeat returns the same handle.

        quantization / quant_group_size as for LLM: the weights are quantized here, once
        per device, in the layout this device's kernels read, and services map the
        quantized buffers. An AWQ / GPTQ checkpoint is published as int4. read_float
        replaces the safetensors reader (bench/gpu_check.py makes random weights with it).
        on_disk (CPU): keep the file on disk (under disk_root()), not in /dev/shm, so
        that sleeping services can give its pages back (weight_pages.py).
        """
        model_path = Path(model_path).resolve()
        config = LlamaConfig.from_pretrained(model_path)
        torch_dtype = parse_dtype(dtype, config)
        qc = checkpoint_quant_config(config.raw, quantization, quant_group_size, self.device)
        if model_name in self._handles:
            if self._sources[model_name] != (model_path, torch_dtype, qc):
                raise ValueError(f"model {model_name!r} is already published from "
                                 f"{self._sources[model_name]}, not "
                                 f"({model_path}, {torch_dtype}, {qc})")
            return self._handles[model_name]
        # Always read into host memory: on CUDA this keeps the device peak at one copy.
        state = read_model_state(model_path, config, torch_dtype, "cpu", qc,
                                 read_float=read_float or read_hf_tensors)
        specs, size = plan_layout(state)
        common = dict(model_name=model_name, device=self.device,
                      dtype=str(torch_dtype).removeprefix("torch."), config=config.raw,
                      specs=specs, nbytes=size, token=os.urandom(8).hex(),
                      quantization=None if qc is None else qc.to_dict())
        if _is_cuda(self.device):
            flat = _cuda_publish(state, specs, size, self.device)
            self.cuda.add(model_name, flat)
            handle = WeightHandle(**common)     # no IPC arguments: share() makes them
            _ATTACHED[handle.token] = unpack(flat, specs)   # IPC cannot reopen in this process
        else:
            path = (self._disk_dir() if on_disk else self.dir) / f"{_safe_name(model_name)}.bin"
            write_file(path, state, specs, size, durable=on_disk)
            handle = WeightHandle(**common, path=str(path))
        self._handles[model_name] = handle
        self._sources[model_name] = (model_path, torch_dtype, qc)
        return handle

    def _disk_dir(self) -> Path:
        """This store's directory on disk, made on first use and removed with the store."""
        if self.disk_dir is None:
            root = disk_root()
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_stores(root)
            self.disk_dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-",
                                                  dir=root))
            self._disk_finalizer = weakref.finalize(self, shutil.rmtree, self.disk_dir,
                                                    ignore_errors=True)
        return self.disk_dir

    def handle(self, model_name: str) -> WeightHandle:
        """The published handle; attach() it in this process. Other processes: share()."""
        return self._handles[model_name]

    def share(self, model_name: str) -> WeightHandle:
        """The handle for ONE consumer process: give each service, and each restart of
        one, its own share, and call end_share() once that process is gone."""
        handle = self._handles[model_name]
        if not _is_cuda(self.device):
            return handle                       # a file path: nothing per consumer
        lease, args = self.cuda.lease(model_name)
        return replace(handle, cuda_ipc=args, lease=lease)

    def end_share(self, handle: WeightHandle) -> None:
        """The consumer `handle` was shared with has exited (or been killed)."""
        if handle.lease is not None:
            self.cuda.end(handle.model_name, handle.lease)

    def models(self) -> list[str]:
        return list(self._handles)

    def bytes_of(self, model_name: str) -> int:
        """Bytes this store holds for the model (its buffer, padding included)."""
        return self._handles[model_name].nbytes

    def total_bytes(self) -> int:
        return sum(h.nbytes for h in self._handles.values())

    def release(self, model_name: str) -> None:
        """Forget the model and free its buffer once no service maps it any more."""
        handle = self._handles.pop(model_name)
        del self._sources[model_name]
        _ATTACHED.pop(handle.token, None)
        self.cuda.retire(model_name)            # freed once no consumer holds a lease
        if handle.path is not None:
            Path(handle.path).unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self._handles):
            self.release(name)
        if self.dir is not None:
            self._finalizer()                   # removes the directory, at most once
        if self.disk_dir is not None:
            self._disk_finalizer()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_root() -> Path:
    """Where on_disk weight files live: colocate's cache directory (the block kernels'
    too), which sits on a disk where /tmp may be tmpfs."""
    return Path(os.environ.get("COLOCATE_CACHE_DIR") or Path.home() / ".cache" / "colocate") \
        / "weights"


def default_root() -> Path:
    """/dev/shm (RAM-backed tmpfs) where it exists, else the temp directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def remove_stale_stores(root: Path) -> list[Path]:
    """Delete store directories under `root` whose owner process no longer exists.

    Caveat: a store of another PID namespace sharing this /dev/shm (docker --ipc=host)
    looks dead from here; give such deployments different roots.
    """
    removed = []
    for d in root.glob(f"{DIR_PREFIX}*-*"):
        m = re.fullmatch(rf"{DIR_PREFIX}(\d+)-.*", d.name)
        if m and d.is_dir() and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _safe_name(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_name) or "model"


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


# ---- service side ---------------------------------------------------------------------

# handle.token -> the state dict mapped in this process. Attaching the same handle again
# reuses it, so N models in one process still map one copy.
_ATTACHED: dict[str, dict[str, torch.Tensor]] = {}
_PAGES: dict[str, WeightPages] = {}          # handle.token -> its file's mapping (CPU)


def attach(handle: WeightHandle) -> LlamaForCausalLM:
    """A model whose parameters are views of the published buffer (nothing is copied).

    CPU parameters are read-only at the page level: an in-place op on a parameter
    raises (it requires grad), and a write that bypasses autograd (`p.data`, no_grad)
    kills the process with SIGSEGV instead of diverging from the other services.
    """
    state = _ATTACHED.get(handle.token)
    if state is None:
        if _is_cuda(handle.device) and handle.cuda_ipc is None:
            raise ValueError(f"{handle.model_name}: a CUDA handle from WeightStore.handle() "
                             "attaches only in the publishing process; pass another "
                             "process WeightStore.share()")
        flat = (_cuda_attach(handle) if handle.cuda_ipc is not None
                else map_file_read_only(handle.path, handle.nbytes))
        state = _ATTACHED[handle.token] = unpack(flat, handle.specs)
        if handle.path is not None:
            _PAGES[handle.token] = WeightPages(flat, handle.path)
    device = handle.device if _is_cuda(handle.device) else "cpu"
    qc = None if handle.quantization is None else QuantConfig.from_dict(handle.quantization)
    model = model_over_state_dict(LlamaConfig.from_dict(handle.config), state,
                                  getattr(torch, handle.dtype), device, qc)
    # What a sleeping engine gives back besides its KV cache (ModelRunner.free_kv_cache).
    model.weight_pages = _PAGES.get(handle.token)
    return model


def detach(handle: WeightHandle) -> None:
    """Drop this process's cached mapping; it is unmapped once no model uses it."""
    _ATTACHED.pop(handle.token, None)
    _PAGES.pop(handle.token, None)


def mapped_bytes() -> int:
    """Bytes of published weights this process maps (for metrics)."""
    return sum(t.nbytes for state in _ATTACHED.values() for t in state.values())


# ---- CUDA: one device buffer shared by IPC (bench/gpu_check.py runs it on a GPU) ------

def _cuda_publish(state: dict[str, torch.Tensor], specs: tuple[TensorSpec, ...],
                  size: int, device: str) -> torch.Tensor:
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    pack(state, specs, flat)                    # host -> device, one tensor at a time
    torch.cuda.synchronize(device)              # consumers must not see a half-filled buffer
    return flat


def _cuda_attach(handle: WeightHandle) -> torch.Tensor:
    """Open the IPC handle: the consumer's view of the supervisor's allocation.

    The supervisor must outlive its consumers. Nothing makes the view read-only on
    CUDA; only the requires-grad guard of attach() catches accidental in-place ops.
    """
    return rebuild_cuda_tensor(handle.cuda_ipc)
