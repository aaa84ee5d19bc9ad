"""The C decode step (kernels/cpu/decode_step.c, colocate/worker/cpu_decode.py) against
the torch path it replaces: the same hidden states and the same K/V written to the
cache, for a batch of sequences of different lengths that cross block boundaries,
with every kernel body the CPU can run (portable C, AVX2, AVX-512 VNNI)."""
from __future__ import annotations

import functools

import pytest
import torch

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches
from colocate.quant import block_kernels, cpu_ops
from colocate.quant.loading import load_model
from colocate.worker import cpu_decode
from colocate.worker.cpu_decode import CpuDecodePlan
from colocate.worker.model_runner import ModelRunner, split_mixed_step

pytestmark = pytest.mark.skipif(not block_kernels.available(),
                                reason="no C compiler: the block kernels did not build")

BS = 4                                   # small blocks: every sequence spans several
PROMPT_LENS = (3, 9, 14)


def _meta(tables: list[list[int]], positions: list[list[int]]) -> AttentionMetadata:
    """Metadata for one step: sequence i adds the tokens at positions[i]."""
    width = max(map(len, tables))
    slots, qsl, lens = [], [0], []
    for table, pos in zip(tables, positions):
        slots += [table[p // BS] * BS + p % BS for p in pos]
        qsl.append(qsl[-1] + len(pos))
        lens.append(pos[-1] + 1)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=qsl, seq_lens=lens,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        block_size=BS, all_decode=all(len(p) == 1 for p in positions))


@functools.lru_cache(maxsize=None)
def _model(path, method, group):
    """One load per quantization for the whole module (both bodies share it)."""
    return load_model(path, quantization=method, quant_group_size=group)


def _prefilled(model, gen):
    """Caches holding each sequence's prompt (torch path), the tables, the last ids."""
    caches = allocate_kv_caches(model.config, 1 + 3 * 8, BS)               # block 0: null
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(PROMPT_LENS))]
    ids = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in PROMPT_LENS]
    meta = _meta(tables, [list(range(n)) for n in PROMPT_LENS])
    model(torch.cat(ids), torch.cat([torch.arange(n) for n in PROMPT_LENS]), caches, meta)
    return caches, tables


@pytest.mark.parametrize("method,group", [(None, None), ("int4", 32), ("int4", 64),
                                          ("int8", None)])
@pytest.mark.parametrize("simd", [block_kernels.BODY_C, block_kernels.BODY_AVX2,
                                  block_kernels.BODY_AVX512])
def test_decode_steps_match_the_torch_path(tiny_gqa_model_dir, method, group, simd,
                                           monkeypatch):
    if simd not in block_kernels.runnable_bodies():
        pytest.skip(f"this CPU cannot run the {block_kernels.BODY_NAMES[simd]} body")
    monkeypatch.setattr(block_kernels, "default_simd", lambda: simd)
    model = _model(tiny_gqa_model_dir, method, group)
    plan = CpuDecodePlan.build(model)
    assert plan is not None
    gen = torch.Generator().manual_seed(1)
    torch_caches, tables = _prefilled(model, gen)
    c_caches = [type(c)(c.key.clone(), c.value.clone()) for c in torch_caches]
    lens, errors = list(PROMPT_LENS), []
    for _ in range(6):                     # crosses a block boundary for every sequence
        # Quantized: each step from the same cache (see below). Float: each path reads
        # back the K/V it wrote itself, so a wrong write shows in the next step's rows.
        for t, c in zip(torch_caches, c_caches) if method is not None else ():
            c.key.copy_(t.key)
            c.value.copy_(t.value)
        ids = torch.randint(3, model.config.vocab_size, (len(lens),), generator=gen)
        pos = torch.tensor(lens)
        meta = _meta(tables, [[n] for n in lens])
        assert plan.covers_cache(c_caches)
        want = model(ids, pos, torch_caches, meta)                            # (S, H)
        got = plan.forward(ids, pos, c_caches, meta)
        errors += ((got - want).norm(dim=1) / want.norm(dim=1)).tolist()
        slots = meta.slot_mapping
        for t, c in zip(torch_caches, c_caches):        # this step's K/V, where they belong
            for mine, ref in ((c.key, t.key), (c.value, t.value)):
                new = ref.flatten(0, 1)[slots]                                # (S, nkv, hd)
                errors_kv = (mine.flatten(0, 1)[slots] - new).norm() / new.norm()
                assert errors_kv < 3e-2
        lens = [n + 1 for n in lens]
    # Both paths quantize each linear's input to int8 per block of 32 and sum floats in
    # different orders: where a value sits within 1e-7 of a rounding boundary its code
    # moves one step, and on these random weights a row then differs by up to ~1.3%
    # (measured: the AVX2 and portable bodies of the C step differ from each other just
    # so). Elsewhere the two agree to float rounding, which a wrong index, head, block
    # or position would not: most rows must agree exactly, every row roughly.
    # A float model quantizes nothing: every row agrees to float rounding.
    exact = sum(e < 1e-5 for e in errors)
    assert max(errors) < (1e-5 if method is None else 3e-2), errors
    assert exact >= 2 * len(errors) // 3, errors


def test_plan_refuses_what_it_does_not_cover(tiny_gqa_model_dir, monkeypatch):
    assert CpuDecodePlan.build(load_model(tiny_gqa_model_dir, dtype=torch.bfloat16)) is None
    quantized = load_model(tiny_gqa_model_dir, quantization="int4", quant_group_size=32)
    plan = CpuDecodePlan.build(quantized)
    int8_caches = allocate_kv_caches(quantized.config, 4, BS, dtype=torch.int8)
    float_caches = allocate_kv_caches(quantized.config, 4, BS)
    assert not plan.covers_cache(int8_caches)
    assert plan.covers_cache(float_caches)
    monkeypatch.setenv(cpu_ops.BACKEND_ENV, "torch")        # torch's int8/int4 ops asked for
    assert CpuDecodePlan.build(quantized) is None
    assert CpuDecodePlan.build(load_model(tiny_gqa_model_dir)) is not None   # float linears
    monkeypatch.setenv(cpu_decode.DECODE_ENV, "torch")
    assert CpuDecodePlan.build(load_model(tiny_gqa_model_dir)) is None
    monkeypatch.setenv(cpu_decode.DECODE_ENV, "fast")
    with pytest.raises(ValueError, match="COLOCATE_CPU_DECODE='fast'"):
        CpuDecodePlan.build(quantized)


@pytest.mark.parametrize("method,group", [(None, None), ("int4", 32)])
def test_a_mixed_step_sends_its_decodes_through_the_c_step(tiny_gqa_model_dir, method,
                                                            group, monkeypatch):
    """Decodes beside a prompt chunk: the runner gives the decodes to the C step and the
    chunk to the model, and every row (and the cache) is what one torch forward gives."""
    model = _model(tiny_gqa_model_dir, method, group)
    gen = torch.Generator().manual_seed(2)
    torch_caches, tables = _prefilled(model, gen)
    runner = ModelRunner(model, model.config, 1 + 3 * 8, BS, torch.float32,
                         torch.device("cpu"))
    for mine, ref in zip(runner.kv_caches, torch_caches):
        mine.key.copy_(ref.key)
        mine.value.copy_(ref.value)
    calls = []
    forward = CpuDecodePlan.forward
    monkeypatch.setattr(CpuDecodePlan, "forward",
                        lambda self, ids, *a: calls.append(ids.numel()) or forward(self, ids, *a))
    # Sequences 0 and 2 decode one token; 1 computes a 5-token chunk after its prompt.
    positions = [[PROMPT_LENS[0]], list(range(PROMPT_LENS[1], PROMPT_LENS[1] + 5)),
                 [PROMPT_LENS[2]]]
    meta = _meta(tables, positions)
    ids = torch.randint(3, model.config.vocab_size, (7,), generator=gen)
    pos = torch.tensor([p for ps in positions for p in ps])
    want = model(ids, pos, torch_caches, meta)                                # (7, H)
    got = runner._forward(ids, pos, meta)
    assert calls == [2]                        # one C call, for the two decodes
    errors = ((got - want).norm(dim=1) / want.norm(dim=1)).tolist()
    assert max(errors) < (1e-5 if method is None else 3e-2), errors
    for mine, ref in zip(runner.kv_caches, torch_caches):
        new = ref.key.flatten(0, 1)[meta.slot_mapping]                         # (7, nkv, hd)
        assert (mine.key.flatten(0, 1)[meta.slot_mapping] - new).norm() / new.norm() < 3e-2


def test_split_mixed_step_keeps_each_sequence_whole():
    meta = _meta([[1, 2], [3, 4, 5], [6]], [[5], [2, 3, 4, 5], [0]])
    (decodes, drows), (chunks, crows) = split_mixed_step(meta)
    assert drows == [0, 5] and crows == [1, 2, 3, 4]
    assert decodes.all_decode and decodes.seq_lens == [6, 1]
    assert decodes.block_tables.tolist() == [[1, 2, 0], [6, 0, 0]]
    assert chunks.query_start_loc == [0, 4] and chunks.seq_lens == [6]
    assert chunks.slot_mapping.tolist() == meta.slot_mapping[1:5].tolist()
    assert split_mixed_step(_meta([[1]], [[0, 1]])) is None                  # no decode
    assert split_mixed_step(_meta([[1], [2]], [[3], [2]])) is None           # no chunk
