"""gpu_check steps 2 and 3: the whole model on CUDA, and a LLaMA-2-13B-shaped model.

Step 2 (model): the tiny presets through the CUDA path (Triton attention, W8A16 /
W4A16 linears) against the CPU path in fp32, greedy tokens compared; the SmolLM2 GGUF
if one is given and this checkout can load GGUF; HF transformers on the GPU if it is
installed. A dry run's "CUDA path" is the kernel path on the CPU: attention through
the interpreted kernels (COLOCATE_ATTENTION_BACKEND=triton).

Step 3 (llama13b): random weights made on the device from
deploy/models/llama-2-13b-chat/config.json (nothing downloaded), in fp16, int8 and int4
g128: decode tokens/s at batch 1, 8, 32, TTFT at 512 and 2,048 prompt tokens, and the
memory it takes against what `colocate plan` books for the same YAML.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from gpu_check import Ctx, NotAvailable

ROOT = Path(__file__).resolve().parents[1]
LLAMA13B = ROOT / "deploy" / "models" / "llama-2-13b-chat"
PRESETS = ("tiny", "tiny-gqa")


# ---- step 2 -----------------------------------------------------------------------

def greedy(model_path: Path, device: str, dtype: str, prompt: list[int], n: int,
           quantization: str | None = None, kv: str = "auto") -> list[int]:
    from colocate import LLM, SamplingParams

    llm = LLM(str(model_path), dtype=dtype, device=device, quantization=quantization,
              kv_cache_dtype=kv, kv_cache_tokens=1024, max_model_len=512)
    out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0,
                                                ignore_eos=True))[0]
    return list(out.token_ids)


def kernel_path_device(ctx: Ctx) -> str:
    """cuda:0, or on a dry run the CPU with attention sent to the interpreted kernels."""
    if ctx.cuda:
        return "cuda:0"
    from colocate.model.attention import ATTENTION_BACKEND_ENV
    os.environ[ATTENTION_BACKEND_ENV] = "triton"
    return "cpu"


def preset_check(ctx: Ctx, preset: str, quantization: str | None, dtype: str) -> dict:
    from colocate.model.attention import ATTENTION_BACKEND_ENV
    from colocate.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(ctx.work / "models" / preset, preset=preset, seed=0)
    prompt = list(range(5, 5 + (12 if ctx.dry else 40)))
    n = 6 if ctx.dry else 24
    want = greedy(path, "cpu", "float32", prompt, n, quantization)
    try:
        got = greedy(path, kernel_path_device(ctx), dtype, prompt, n, quantization)
    finally:
        os.environ.pop(ATTENTION_BACKEND_ENV, None)
    same = sum(a == b for a, b in zip(got, want))
    # fp32 on both sides must agree token for token; fp16 may tip a near tie late on.
    return {"tokens_equal": same, "of": n, "ok": got == want if dtype == "float32" else True,
            "first_difference": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                                     None)}


def gguf_check(ctx: Ctx) -> dict:
    if ctx.gguf is None:
        raise NotAvailable("no --gguf FILE given (carry SmolLM2's GGUF to the device)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise NotAvailable("the gguf package is not installed here") from None
    prompt, n = [1, 504, 3458, 314], 8 if ctx.dry else 32
    try:
        want = greedy(ctx.gguf, "cpu", "float32", prompt, n)
    except (ValueError, OSError) as exc:
        raise NotAvailable(f"this checkout cannot load GGUF: {exc}") from None
    got = greedy(ctx.gguf, kernel_path_device(ctx), "float32", prompt, n)
    os.environ.pop("COLOCATE_ATTENTION_BACKEND", None)
    return {"tokens_equal": sum(a == b for a, b in zip(got, want)), "of": n, "ok": got == want}


def hf_check(ctx: Ctx, preset: str) -> dict:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise NotAvailable("transformers is not installed here") from None
    path = ctx.work / "models" / preset
    prompt = list(range(5, 5 + (12 if ctx.dry else 40)))
    n = 6 if ctx.dry else 24
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(ctx.device)
    ids = torch.tensor([prompt], device=ctx.device)
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    theirs = out[0, len(prompt):].tolist()
    ours = greedy(path, kernel_path_device(ctx), "float32", prompt, n)
    os.environ.pop("COLOCATE_ATTENTION_BACKEND", None)
    return {"tokens_equal": sum(a == b for a, b in zip(ours, theirs)), "of": n,
            "ok": ours == theirs}


def run_model(ctx: Ctx) -> None:
    # A dry run keeps to the GQA preset, float and int4: the script's paths, in seconds.
    combos = ((None, "float32"), ("int8", "float32"), ("int4", "float32"), (None, "float16"))
    for preset in PRESETS[1:] if ctx.dry else PRESETS:
        for quant, dtype in combos[::2] if ctx.dry else combos:
            ctx.check("model", f"{preset}-{quant or 'float'}-{dtype}",
                      lambda: preset_check(ctx, preset, quant, dtype))
    ctx.check("model", "smollm2-gguf", lambda: gguf_check(ctx))
    ctx.check("model", "hf-transformers-tiny-gqa", lambda: hf_check(ctx, PRESETS[1]))


# ---- step 3 -----------------------------------------------------------------------

def llama13b_config(ctx: Ctx) -> Path:
    """The real config.json, or on a dry run the same structure shrunk to a toy."""
    if not ctx.dry:
        return LLAMA13B
    raw = json.loads((LLAMA13B / "config.json").read_text())
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
               torch_dtype="float32")
    out = ctx.work / "models" / "llama13b-toy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def random_model(path: Path, device: torch.device, dtype: torch.dtype,
                 quantization: str | None, group: int):
    """A model with random weights made straight on `device` (no checkpoint read):
    the loader's own path from float tensors, quantized where asked."""
    from colocate.quant.loading import model_over_state_dict
    from colocate.model.checkpoint import hf_tensor_shapes
    from colocate.model.model_config import LlamaConfig
    from colocate.quant.config import QuantConfig
    from colocate.quant.loading import read_model_state

    config = LlamaConfig.from_pretrained(path)
    qc = QuantConfig.for_device(quantization, group, str(device))
    gen = torch.Generator(device=device).manual_seed(0)

    def read_random(_path, cfg, dt, dev):
        return {name: (torch.ones(shape, device=dev, dtype=dt) if "norm" in name else
                       (torch.randn(shape, generator=gen, device=dev) * 0.02).to(dt))
                for name, shape in hf_tensor_shapes(cfg).items()}
    state = read_model_state(path, config, dtype, device, qc, read_float=read_random)
    return model_over_state_dict(config, state, dtype, device, qc), config


def engine_for(model, config, ctx: Ctx, dtype: torch.dtype, kv_tokens: int,
               max_batched: int):
    from colocate.engine.config import EngineConfig
    from colocate.worker.engine_factory import build_engine

    return build_engine(model, config, None,
                        EngineConfig(max_model_len=4096, kv_cache_tokens=kv_tokens,
                                     max_num_seqs=64, max_num_batched_tokens=max_batched),
                        dtype=dtype, device=ctx.device)


def decode_rate(ctx: Ctx, engine, batch: int, new_tokens: int) -> float:
    """Tokens/s over the decode steps of `batch` requests (prefill steps excluded)."""
    from colocate import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(list(range(3 + i, 35 + i)), params)
    started = {}
    while len(started) < batch:                      # prefill: until all have a token
        for out in engine.step():
            started[out.request_id] = True
    ctx.sync()
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    ctx.sync()
    return batch * steps / (time.perf_counter() - t0)


def ttft_ms(ctx: Ctx, engine, prompt_len: int) -> float:
    from colocate import SamplingParams

    engine.add_request(list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    ctx.sync()
    return (time.perf_counter() - t0) * 1e3


def planned(path: Path, ctx: Ctx, dtype: str, quantization: str | None, group: int,
            kv_budget: str) -> dict:
    """What `colocate plan` books for one service of this model: weights and KV."""
    from colocate.config import load_config
    from colocate.memory.arbiter import MemoryArbiter

    yaml = ctx.work / f"plan-{quantization or dtype}.yaml"
    quant = f", quantization: {quantization}" if quantization else ""
    quant += f", quant_group_size: {group}" if quantization == "int4" else ""
    yaml.write_text(f"models:\n  m: {{path: {path}, dtype: {dtype}{quant}}}\n"
                    f"gpus:\n  - device: {'cpu' if ctx.dry else 'cuda:0'}\n"
                    f"    memory: 139GiB\n    services:\n      - name: s\n        model: m\n"
                    f"        port: 50051\n        max_model_len: 4096\n"
                    f"        kv_cache: {{budget: {kv_budget}}}\n"
                    f"        tenants: [{{name: t, token_env: GPU_CHECK_PLAN_TOKEN}}]\n")
    config = load_config(yaml, check_env=False)
    arbiter = MemoryArbiter.for_device(config.gpus[0], config)
    demand = arbiter.demand(config.gpus[0].services[0])
    return {"weight_bytes": arbiter.footprint("m").weight_bytes(),
            "kv_bytes_per_token": demand.kv_bytes_per_token, "kv_tokens": demand.kv_tokens}


def allocated(ctx: Ctx, tensors=()) -> int:
    """Device bytes allocated now (CUDA), or the given tensors' bytes (CPU)."""
    if ctx.cuda:
        ctx.sync()
        return torch.cuda.memory_allocated(ctx.device)
    return sum(t.nbytes for t in tensors)


def llama13b_check(ctx: Ctx, dtype_name: str, quantization: str | None) -> dict:
    path = llama13b_config(ctx)
    dtype = getattr(torch, dtype_name)
    group = 32 if ctx.dry else 128
    kv_tokens = 512 if ctx.dry else 40960
    plan = planned(path, ctx, dtype_name, quantization, group,
                   "64KiB" if ctx.dry else "32GiB")
    before = allocated(ctx)
    model, config = random_model(path, ctx.device, dtype, quantization, group)
    weights = allocated(ctx, list(model.state_dict().values())) - before
    engine = engine_for(model, config, ctx, dtype, kv_tokens, 2048 if not ctx.dry else 64)
    caches = [t for c in engine.runner.kv_caches for t in (c.key, c.value, c.key_scale,
                                                            c.value_scale) if t is not None]
    kv = allocated(ctx, caches) - (before + weights if ctx.cuda else 0)
    batches = [1, 2] if ctx.dry else [1, 8, 32]
    new = 4 if ctx.dry else 64
    ttft_warm = ttft_ms(ctx, engine, 8)                  # first call: kernels compile
    result = {"weights_measured_bytes": weights, "weights_planned_bytes": plan["weight_bytes"],
              "kv_measured_bytes_per_token": kv / (engine.runner.kv_caches[0].key.shape[0] * 16),
              "kv_planned_bytes_per_token": plan["kv_bytes_per_token"],
              "first_call_ms": ttft_warm}
    for b in batches:
        result[f"decode_tok_s_b{b}"] = decode_rate(ctx, engine, b, new)
    for n in ([16, 32] if ctx.dry else [512, 2048]):
        result[f"ttft_ms_{n}"] = ttft_ms(ctx, engine, n)
    # The plan is an upper bound the arbiter books; over it by more than 2% is a wrong plan.
    result["ok"] = weights <= 1.02 * plan["weight_bytes"]
    del engine, model
    return result


def run_llama13b(ctx: Ctx) -> None:
    dtype = "float32" if ctx.dry else "float16"
    for quant in (None, "int8", "int4"):
        ctx.check("llama13b", f"{quant or dtype}", lambda: llama13b_check(ctx, dtype, quant))
