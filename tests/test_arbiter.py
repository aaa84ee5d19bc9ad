"""MemoryArbiter and the sizing behind it: DESIGN.md's 13B arithmetic, weight sharing,
admission with the shortfall in bytes, release."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from colocate.config import KVCacheSpec, ModelSpec, ServiceSpec, TenantSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.probe import device_capacity, process_memory
from colocate.memory.sizing import (KV_BLOCK_SIZE, KV_INT8_SCALE_BYTES, ModelFootprint,
                                    kv_budget)

LLAMA_13B = str(Path(__file__).resolve().parent.parent / "deploy" / "models" / "llama-2-13b-chat")
GiB = 2**30


def footprint(quantization=None, dtype="float16") -> ModelFootprint:
    return ModelFootprint.of(ModelSpec("llama2-13b", LLAMA_13B, dtype=dtype,
                                       quantization=quantization))


def service(name="chat-a", kv_dtype="int8", budget=20 * GiB, tokens=None, port=50051,
            model="llama2-13b") -> ServiceSpec:
    kv = KVCacheSpec(dtype=kv_dtype, budget_bytes=None if tokens else budget, tokens=tokens)
    return ServiceSpec(name=name, model=model, port=port, max_model_len=4096, kv_cache=kv,
                       tenants=(TenantSpec("t", "T"),))


def arbiter(capacity=80 * 10**9, share=True, quantization="int4") -> MemoryArbiter:
    return MemoryArbiter("cuda:0", capacity, {"llama2-13b": footprint(quantization)},
                         share_weights=share)


# ---- DESIGN.md's table ---------------------------------------------------------------

def test_13b_parameters():
    assert footprint().shape.num_parameters() == pytest.approx(13.0e9, rel=0.01)


@pytest.mark.parametrize("quantization, gigabytes, tol", [
    (None, 26.0, 0.1),     # fp16
    ("int8", 13.3, 0.1),   # per channel, embeddings and lm_head fp16
    ("int4", 7.3, 0.15),   # group 128, fp16 scale and zero per group: 7.40 GB exactly
])
def test_13b_weight_bytes(quantization, gigabytes, tol):
    assert footprint(quantization).weight_bytes() / 1e9 == pytest.approx(gigabytes, abs=tol)


def test_13b_kv_bytes_per_token():
    fp = footprint()
    assert fp.kv_bytes_per_token("auto") == 819_200 == 2 * 40 * 5120 * 2
    scales = 2 * 40 * 40 * KV_INT8_SCALE_BYTES     # K and V, per layer, per KV head
    assert fp.kv_bytes_per_token("int8") == 409_600 + scales


def test_20gib_int8_pool_holds_about_50k_tokens():
    per_token, tokens, charged = kv_budget(footprint("int4"), service())
    assert per_token == 409_600 + 2 * 40 * 40 * KV_INT8_SCALE_BYTES
    assert tokens % KV_BLOCK_SIZE == 0 and tokens * per_token <= 20 * GiB
    assert (20 * GiB - tokens * per_token) < KV_BLOCK_SIZE * per_token  # floor to blocks
    assert 49_000 < tokens < 53_000
    assert charged == 20 * GiB


def test_token_budget_rounds_up_to_blocks():
    per_token, tokens, charged = kv_budget(footprint(), service(kv_dtype="auto", tokens=1000))
    assert tokens == 1008 and charged == 1008 * per_token == 1008 * 819_200


def test_int8_kv_roughly_doubles_tokens():
    fp = footprint()
    _, fp16_tokens, _ = kv_budget(fp, service(kv_dtype="auto"))
    _, int8_tokens, _ = kv_budget(fp, service(kv_dtype="int8"))
    assert 1.8 < int8_tokens / fp16_tokens <= 2.0


def test_workspace_grows_with_batched_tokens():
    fp = footprint("int4")
    small, large = fp.workspace_bytes(512, 64), fp.workspace_bytes(2048, 64)
    assert 0 < small < large < 1 * GiB


# ---- the ledger ------------------------------------------------------------------------

def weight_rows(a: MemoryArbiter) -> int:
    return sum(r.bytes for r in a.ledger() if "weights" in r.item)


@pytest.mark.parametrize("share, copies", [(True, 1), (False, 3)])
def test_weights_counted_once_when_shared(share, copies):
    a = arbiter(capacity=10**12, share=share)
    for i, name in enumerate(["chat-a", "chat-b", "chat-c"]):
        a.admit(service(name, port=50051 + i))
    assert weight_rows(a) == copies * footprint("int4").weight_bytes()
    assert a.reserved_bytes + a.free_bytes == a.capacity


def test_a100_three_shared_int4_services_fit():
    a = arbiter()
    for i, name in enumerate(["chat-a", "chat-b", "chat-c"]):
        a.admit(service(name, port=50051 + i))
    assert 0 < a.free_bytes


def test_refusal_states_the_shortfall():
    a = arbiter(capacity=80 * 10**9, share=False, quantization=None)
    a.admit(service("chat-a", kv_dtype="auto", budget=4 * GiB))
    a.admit(service("chat-b", kv_dtype="auto", budget=4 * GiB, port=50052))
    third = service("chat-c", kv_dtype="auto", budget=4 * GiB, port=50053)
    expected = a.cost(third) - a.free_bytes
    assert expected > 0 and a.shortfall(third) == expected and not a.can_admit(third)
    before = a.ledger()
    with pytest.raises(AdmissionRefused) as info:
        a.admit(third)
    assert info.value.shortfall == expected
    assert f"short by {expected:,} bytes" in str(info.value)
    assert "chat-c" in str(info.value) and "share_weights is false" in str(info.value)
    assert a.ledger() == before          # a refusal books nothing


def test_release_frees_the_share_and_shared_weights_go_last():
    a = arbiter()
    empty_free = a.free_bytes
    a.admit(service("chat-a"))
    a.admit(service("chat-b", port=50052))
    a.release("chat-a")
    assert weight_rows(a) == footprint("int4").weight_bytes()   # chat-b still uses them
    a.release("chat-b")
    assert a.free_bytes == empty_free and weight_rows(a) == 0
    with pytest.raises(KeyError):
        a.release("chat-b")


def test_release_makes_room_for_a_refused_service():
    a = arbiter(capacity=40 * 10**9)
    a.admit(service("chat-a"))
    b = service("chat-b", port=50052)
    assert a.shortfall(b) > 0
    a.release("chat-a")
    a.admit(b)


def test_admitting_twice_is_an_error():
    a = arbiter()
    a.admit(service())
    with pytest.raises(ValueError, match="already admitted"):
        a.admit(service())


# ---- probe -----------------------------------------------------------------------------

def test_cpu_probe():
    assert device_capacity("cpu") == psutil.virtual_memory().total
    assert process_memory() > 0


def test_cpu_paths_never_load_cuda_libraries():
    code = ("import sys; from colocate.memory.probe import device_capacity, device_used;"
            "device_capacity('cpu'); device_used('cpu');"
            "from colocate.memory.plan_report import plan_deployment;"
            "assert 'pynvml' not in sys.modules, 'pynvml loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_fused_group_books_one_runtime_and_its_largest_workspace():
    """batching: fused puts the services of one model in one process: the ledger
    charges that process's runtime once and one workspace sized by its largest step."""
    import dataclasses

    isolated, fused = arbiter(), arbiter()
    fused.fused = True
    small = service("chat-a", budget=4 * GiB)
    big = dataclasses.replace(service("chat-b", budget=4 * GiB, port=50052),
                              max_num_batched_tokens=4096)
    third = service("chat-c", budget=4 * GiB, port=50053)
    for a in (isolated, fused):
        for s in (small, big, third):
            a.admit(s)
    ws = {s.name: isolated.demand(s).workspace_bytes for s in (small, big, third)}
    runtime = isolated.demand(small).runtime_bytes
    booked = {d.service: d for d in fused.admitted()}
    assert booked["chat-a"].workspace_bytes == ws["chat-a"]
    assert booked["chat-b"].workspace_bytes == ws["chat-b"] - ws["chat-a"]   # grows to the max
    assert booked["chat-c"].workspace_bytes == 0
    assert [booked[n].runtime_bytes for n in ("chat-a", "chat-b", "chat-c")] == [runtime, 0, 0]
    saved = isolated.reserved_bytes - fused.reserved_bytes
    assert saved == 2 * runtime + ws["chat-a"] + ws["chat-c"]
    assert sum(d.workspace_bytes for d in booked.values()) == max(ws.values())
