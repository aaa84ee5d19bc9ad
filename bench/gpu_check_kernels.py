"""gpu_check step 1: every Triton kernel against a torch reference, timed against torch's own.

Paged decode and prefill attention (fp16, bf16, int8 KV; GQA 40:40 and 32:8; contexts
1 to 4k; block ids past int32 element offsets), the KV write, and W8A16 / W4A16 at
LLaMA-2-13B shapes. References run in fp32 on the same device; "torch" times are
SDPA on contiguous K/V and F.linear on dequantized weights (cuBLAS on a GPU).
The helpers here are shared with the traps step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_check import Ctx, max_error

BLOCK_SIZE = 16


@dataclass
class Paged:
    """A random paged batch on one device: caches, block tables, per-sequence lengths."""
    q: torch.Tensor                       # (T, nh, hd)
    key_cache: torch.Tensor               # (num_blocks, bs, nkv, hd)
    value_cache: torch.Tensor
    key_scale: torch.Tensor | None        # (num_blocks, bs, nkv) fp32 for int8
    value_scale: torch.Tensor | None
    block_tables: torch.Tensor            # (S, max_blocks) int64
    seq_lens: list[int]
    query_lens: list[int]

    @property
    def query_start_loc(self) -> list[int]:
        out = [0]
        for n in self.query_lens:
            out.append(out[-1] + n)
        return out

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's keys and values (L, nkv, hd), fp32, dequantized."""
        L, bs = self.seq_lens[i], self.key_cache.shape[1]
        pos = torch.arange(L, device=self.q.device)
        slots = self.block_tables[i, pos // bs] * bs + pos % bs                  # (L,)
        out = []
        for codes, scales in ((self.key_cache, self.key_scale),
                              (self.value_cache, self.value_scale)):
            x = codes.view(-1, *codes.shape[2:])[slots].float()                  # (L, nkv, hd)
            if scales is not None:
                x = x * scales.view(-1, scales.shape[2])[slots].unsqueeze(-1)
            out.append(x)
        return out[0], out[1]


def make_paged(ctx: Ctx, seq_lens: list[int], query_lens: list[int], nh: int, nkv: int,
               hd: int, dtype: torch.dtype, kv: str, high_block_ids: bool = False,
               seed: int = 0) -> Paged:
    """kv: "auto" (the cache in q's dtype) or "int8". high_block_ids: the cache is
    sized so the blocks used start past element 2**31 (torch.empty: on the CPU only the
    touched pages are backed; on a GPU it is really allocated)."""
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    dev = ctx.device
    per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    used = sum(per_seq)
    block_elems = BLOCK_SIZE * nkv * hd
    first = (2**31 // block_elems + 1) if high_block_ids else 1
    num_blocks = first + used + 1
    cache_dtype = torch.int8 if kv == "int8" else dtype
    shape = (num_blocks, BLOCK_SIZE, nkv, hd)
    caches = [torch.empty(shape, dtype=cache_dtype, device=dev) for _ in "kv"]
    scales = [torch.empty(shape[:3], device=dev) for _ in "kv"] if kv == "int8" else [None, None]
    ids = first + torch.randperm(used, generator=gen, device=dev)
    tables = torch.zeros(len(seq_lens), max(per_seq + [1]), dtype=torch.long, device=dev)
    at = 0
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = ids[at:at + nb]
        at += nb
    for c, s in zip(caches, scales):          # fill only the blocks in use
        n = (used, BLOCK_SIZE, nkv, hd)
        if kv == "int8":
            c[ids] = torch.randint(-127, 128, n, generator=gen, device=dev, dtype=torch.int8)
            s[ids] = torch.rand(n[:3], generator=gen, device=dev) * 0.02 + 1e-3
        else:
            c[ids] = torch.randn(n, generator=gen, device=dev).to(dtype)
    q = torch.randn(sum(query_lens), nh, hd, generator=gen, device=dev).to(dtype)
    return Paged(q, caches[0], caches[1], scales[0], scales[1], tables, list(seq_lens),
                 list(query_lens))


def reference_attention(p: Paged, scale: float) -> torch.Tensor:
    """(T, nh, hd) fp32: causal over each sequence's cached keys, SDPA in fp32."""
    out = torch.zeros(p.q.shape, dtype=torch.float32, device=p.q.device)
    qsl = p.query_start_loc
    for i, L in enumerate(p.seq_lens):
        a, b = qsl[i], qsl[i + 1]
        if a == b:
            continue
        k, v = p.kv(i)
        q = p.q[a:b].float().transpose(0, 1)                                  # (nh, q, hd)
        q_pos = torch.arange(L - (b - a), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]   # (q, L)
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[a:b] = o.transpose(0, 1)
    return out


def torch_sdpa_ms(ctx: Ctx, p: Paged, scale: float) -> float:
    """Torch's own attention on the same work: SDPA per sequence on contiguous K/V in
    q's dtype (the gather is done beforehand and not timed)."""
    qsl = p.query_start_loc
    kvs = [tuple(x.to(p.q.dtype).transpose(0, 1) for x in p.kv(i)) for i in range(len(p.seq_lens))]

    def run():
        for i, (k, v) in enumerate(kvs):
            a, b = qsl[i], qsl[i + 1]
            if a < b:
                F.scaled_dot_product_attention(p.q[a:b].transpose(0, 1), k, v, scale=scale,
                                               is_causal=(b - a) > 1, enable_gqa=True)
    return ctx.time_ms(run)


def run_decode(p: Paged, scale: float) -> torch.Tensor:
    from colocate.kernels import paged_decode_attention

    lens = torch.tensor(p.seq_lens, dtype=torch.int32, device=p.q.device)
    return paged_decode_attention(p.q, p.key_cache, p.value_cache, p.block_tables, lens, scale,
                                  key_scale=p.key_scale, value_scale=p.value_scale,
                                  max_seq_len=max(p.seq_lens))


def run_prefill(p: Paged, scale: float) -> torch.Tensor:
    from colocate.kernels import paged_prefill_attention

    dev = p.q.device
    return paged_prefill_attention(
        p.q, p.key_cache, p.value_cache, p.block_tables,
        torch.tensor(p.query_start_loc, dtype=torch.int32, device=dev),
        torch.tensor(p.seq_lens, dtype=torch.int32, device=dev), max(p.query_lens), scale,
        key_scale=p.key_scale, value_scale=p.value_scale)


# fp16 / bf16 outputs of an exact softmax over a few thousand keys: a few ulps of the
# output dtype. bf16 has 8 mantissa bits.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}


def attention_check(ctx: Ctx, kind: str, seq_lens: list[int], query_lens: list[int], nh: int,
                    nkv: int, hd: int, dtype: torch.dtype, kv: str, high: bool = False) -> dict:
    p = make_paged(ctx, seq_lens, query_lens, nh, nkv, hd, dtype, kv, high_block_ids=high)
    scale = hd ** -0.5
    launch = run_decode if kind == "decode" else run_prefill
    err = max_error(launch(p, scale), reference_attention(p, scale))
    tol = TOLERANCE[dtype]
    return {"max_abs_err": err, "tol": tol, "ok": err <= tol,
            "kernel_ms": ctx.time_ms(lambda: launch(p, scale)),
            "torch_sdpa_ms": torch_sdpa_ms(ctx, p, scale),
            "max_block_id": int(p.block_tables.max())}


def kv_write_check(ctx: Ctx, tokens: int, nkv: int, hd: int, dtype: torch.dtype, kv: str,
                   high: bool = False) -> dict:
    from colocate.kernels import reshape_and_cache
    from colocate.model.kv_cache import quantize_kv

    gen = torch.Generator(device=ctx.device).manual_seed(1)
    dev = ctx.device
    block_elems = BLOCK_SIZE * nkv * hd
    first = (2**31 // block_elems + 1) if high else 1
    blocks = -(-tokens // BLOCK_SIZE) + 1
    shape = (first + blocks, BLOCK_SIZE, nkv, hd)
    cache_dtype = torch.int8 if kv == "int8" else dtype
    kc, vc = (torch.empty(shape, dtype=cache_dtype, device=dev) for _ in "kv")
    ks, vs = ((torch.empty(shape[:3], device=dev) for _ in "kv") if kv == "int8"
              else (None, None))
    key = torch.randn(tokens, nkv, hd, generator=gen, device=dev).to(dtype)
    value = torch.randn(tokens, nkv, hd, generator=gen, device=dev).to(dtype)
    slots = first * BLOCK_SIZE + torch.randperm(blocks * BLOCK_SIZE, generator=gen,
                                                device=dev)[:tokens]
    reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    ok = True
    for x, codes, scales in ((key, kc, ks), (value, vc, vs)):
        stored = codes.view(-1, nkv, hd)[slots]
        if kv == "int8":
            want_codes, want_scales = quantize_kv(x)
            ok &= torch.equal(stored, want_codes)
            ok &= torch.equal(scales.view(-1, nkv)[slots], want_scales)
        else:
            ok &= torch.equal(stored, x)

    def torch_write():              # torch's own: what the CPU path does
        if kv == "int8":
            for x, codes, scales in ((key, kc, ks), (value, vc, vs)):
                qx, sx = quantize_kv(x)
                codes.view(-1, nkv, hd).index_copy_(0, slots, qx)
                scales.view(-1, nkv).index_copy_(0, slots, sx)
        else:
            kc.view(-1, nkv, hd).index_copy_(0, slots, key)
            vc.view(-1, nkv, hd).index_copy_(0, slots, value)
    return {"exact": bool(ok), "ok": bool(ok),
            "kernel_ms": ctx.time_ms(lambda: reshape_and_cache(key, value, kc, vc, slots, ks, vs)),
            "torch_ms": ctx.time_ms(torch_write), "max_slot": int(slots.max())}


def matmul_check(ctx: Ctx, bits: int, m: int, n: int, k: int, dtype: torch.dtype,
                 group: int = 128) -> dict:
    from colocate.quant.rtn import quantize_int4, quantize_int8

    gen = torch.Generator(device=ctx.device).manual_seed(2)
    dev = ctx.device
    w = torch.randn(n, k, generator=gen, device=dev) * 0.02
    x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
    if bits == 8:
        from colocate.kernels.w8a16_matmul import w8a16_matmul

        qw = quantize_int8(w, scale_dtype=dtype)
        w_deq = qw.dequantize().to(dtype)                                      # (n, k)
        kernel = lambda: w8a16_matmul(x, qw.q, qw.scale)                       # noqa: E731
    else:
        from colocate.kernels.w4a16_matmul import w4a16_matmul
        from colocate.quant import int4_layouts

        packed = int4_layouts.pack_kn(quantize_int4(w, group), dtype)
        w_deq = int4_layouts.dequantize("kn", packed, group).to(dtype)
        kernel = lambda: w4a16_matmul(x, packed["qweight"], packed["scale"],   # noqa: E731
                                      packed["zero"], group)
    ref = F.linear(x.float(), w_deq.float())
    err = max_error(kernel(), ref)
    # fp32 accumulation over k terms, the output rounded once to fp16 / bf16.
    tol = TOLERANCE[dtype] * max(1.0, float(ref.abs().max()))
    return {"max_abs_err": err, "tol": tol, "ok": err <= tol,
            "kernel_ms": ctx.time_ms(kernel),
            "torch_dequantized_ms": ctx.time_ms(lambda: F.linear(x, w_deq))}


def shapes(ctx: Ctx) -> dict:
    """Real sizes on a GPU; toys for a dry run (same code, interpreter-friendly)."""
    if ctx.dry:
        return dict(heads=[(4, 4), (4, 2)], hd=16, contexts=[1, 13, 40], dtypes=["fp32", "int8"],
                    linears={"qkv": (48, 64)}, ms=[1, 3], group=32, kv_tokens=7)
    return dict(heads=[(40, 40), (32, 8)], hd=128, contexts=[1, 17, 512, 4096],
                dtypes=["fp16", "bf16", "int8"],
                linears={"qkv": (15360, 5120), "o": (5120, 5120), "gate_up": (27648, 5120),
                         "down": (5120, 13824)}, ms=[1, 512], group=128, kv_tokens=4096)


DTYPES = {"fp16": (torch.float16, "auto"), "bf16": (torch.bfloat16, "auto"),
          "int8": (torch.float16, "int8"), "fp32": (torch.float32, "auto")}


def run(ctx: Ctx) -> None:
    sz = shapes(ctx)
    hd, ctxs = sz["hd"], sz["contexts"]
    for nh, nkv in sz["heads"]:
        for name in sz["dtypes"]:
            dtype, kv = DTYPES[name]
            if ctx.dry and dtype != torch.float32 and kv == "int8":
                dtype = torch.float32               # the CPU has no fast fp16 to check against
            for kind in ("decode", "prefill"):
                qlens = [1] * len(ctxs) if kind == "decode" else list(ctxs)
                ctx.check("kernels", f"{kind}-{name}-{nh}:{nkv}",
                          lambda: attention_check(ctx, kind, ctxs, qlens, nh, nkv, hd, dtype, kv))
    # fp16 on the CPU too: the dry run's cache is then 4 GiB of address space per K / V
    # (mostly unbacked), half what fp32 would reserve.
    for kind in ("decode", "prefill"):
        ctx.check("kernels", f"{kind}-block-ids-past-int32",
                  lambda: attention_check(ctx, kind, [ctxs[-1]], [1 if kind == "decode" else 8],
                                          sz["heads"][-1][0], sz["heads"][-1][1] if not ctx.dry
                                          else 1, hd, torch.float16, "auto", high=True))
    dtype = torch.float32 if ctx.dry else torch.float16
    for kv in ("auto", "int8"):
        ctx.check("kernels", f"kv-write-{kv}",
                  lambda: kv_write_check(ctx, sz["kv_tokens"], sz["heads"][-1][1], hd, dtype, kv))
    for lname, (n, k) in sz["linears"].items():
        for m in sz["ms"]:
            for bits in (8, 4):
                ctx.check("kernels", f"w{bits}a16-{lname}-m{m}",
                          lambda: matmul_check(ctx, bits, m, n, k, dtype, sz["group"]))
