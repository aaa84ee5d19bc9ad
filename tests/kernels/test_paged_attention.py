"""paged_decode_attention and paged_prefill_attention against the torch reference."""
from __future__ import annotations

import pytest
import torch

from colocate.kernels import paged_decode_attention, paged_prefill_attention
from tests.kernels.reference import make_batch, reference_attention

HEADS = [(4, 4), (4, 2), (8, 2)]          # (nh, nkv): GQA ratios 1, 2, 4
HEAD_DIM = 16
# (q dtype, int8 cache?, atol): int8 codes dequantize exactly in the reference, so
# int8 is held to the q dtype's tolerance.
KINDS = {"fp32": (torch.float32, False, 2e-5), "fp16": (torch.float16, False, 2e-3),
         "bf16": (torch.bfloat16, False, 2e-2), "int8": (torch.float32, True, 2e-5),
         "int8-fp16": (torch.float16, True, 2e-3)}
SCALE = HEAD_DIM ** -0.5


def run_decode(batch, **kw) -> torch.Tensor:
    return paged_decode_attention(
        batch.q, batch.key_cache, batch.value_cache, batch.block_tables,
        torch.tensor(batch.seq_lens), SCALE, key_scale=batch.key_scale,
        value_scale=batch.value_scale, max_seq_len=max(batch.seq_lens), **kw)


def run_prefill(batch, **kw) -> torch.Tensor:
    qsl = batch.query_start_loc
    return paged_prefill_attention(
        batch.q, batch.key_cache, batch.value_cache, batch.block_tables,
        torch.tensor(qsl, dtype=torch.int32), torch.tensor(batch.seq_lens, dtype=torch.int32),
        max(b - a for a, b in zip(qsl, qsl[1:])), SCALE, key_scale=batch.key_scale,
        value_scale=batch.value_scale, **kw)


def check(out: torch.Tensor, batch, atol: float) -> None:
    ref = reference_attention(batch, SCALE)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}h{h[1]}kv")
def test_decode_split_across_partitions(heads, block_size, kind):
    dtype, kv_int8, atol = KINDS[kind]
    # A one-token context, an odd one inside one partition, one over three partitions.
    batch = make_batch([1, 13, 37], [1, 1, 1], *heads, HEAD_DIM, block_size, dtype, kv_int8)
    check(run_decode(batch, partition_size=16, block_n=16), batch, atol)


@pytest.mark.parametrize("kv_int8", [False, True])
def test_decode_single_partition_writes_output_directly(kv_int8):
    batch = make_batch([5, 23], [1, 1], 4, 2, HEAD_DIM, 8, kv_int8=kv_int8, seed=1)
    check(run_decode(batch, partition_size=64, block_n=16), batch, 2e-5)


def test_decode_into_a_strided_query_and_output():
    """q as the model has it: a view of the fused q/k projection (row stride > nh * hd)."""
    batch = make_batch([9, 30], [1, 1], 4, 2, HEAD_DIM, 16, seed=2)
    fused = torch.randn(2, 7, HEAD_DIM)
    fused[:, :4] = batch.q
    batch.q = fused[:, :4]                                                # (2, 4, hd), stride 7*hd
    out = torch.empty(2, 5, HEAD_DIM)[:, 1:]
    assert run_decode(batch, out=out, partition_size=16, block_n=16) is out
    check(out, batch, 2e-5)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}h{h[1]}kv")
def test_prefill_chunks_over_cached_prefix(heads, block_size, kind):
    dtype, kv_int8, atol = KINDS[kind]
    # Per sequence (seq_len, new tokens): a fresh prefill; a 17-token chunk after a
    # 20-token prefix (two query blocks); no new tokens; a one-token decode.
    batch = make_batch([5, 37, 20, 3], [5, 17, 0, 1], *heads, HEAD_DIM, block_size, dtype,
                       kv_int8)
    check(run_prefill(batch), batch, atol)


def test_prefill_wider_tiles_and_odd_head_dim():
    """head_dim 24 pads to a 32-wide tile; 32-token tiles span several cache blocks."""
    batch = make_batch([40, 7], [33, 7], 4, 1, 24, 8, seed=3)
    check(run_prefill(batch, block_m=32, block_n=32), batch, 2e-5)


def test_prefill_with_no_tokens_is_a_no_op():
    batch = make_batch([4], [0], 4, 4, HEAD_DIM, 8)
    assert run_prefill(batch).shape == (0, 4, HEAD_DIM)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int8-fp16"])
def test_decode_odd_group_and_head_dim(kind):
    """A GQA group of 5 pads to the 16 rows tl.dot needs; head_dim 24 pads to 32."""
    dtype, kv_int8, atol = KINDS[kind]
    batch = make_batch([3, 29], [1, 1], 10, 2, 24, 8, dtype, kv_int8, seed=4)
    ref = reference_attention(batch, 24 ** -0.5)
    out = paged_decode_attention(
        batch.q, batch.key_cache, batch.value_cache, batch.block_tables,
        torch.tensor(batch.seq_lens), 24 ** -0.5, key_scale=batch.key_scale,
        value_scale=batch.value_scale, partition_size=16, block_n=16)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_decode_caps_the_partition_count():
    """90 tokens in 16-token partitions would be 6; capped at 2, each covers 48."""
    from colocate.kernels.paged_decode_attention import _partition_size

    assert _partition_size(90, 16, 16, 2) == 48
    assert _partition_size(90, 16, 16, 64) == 16
    assert _partition_size(32768, 512, 32, 64) == 512
    assert _partition_size(131072, 512, 32, 64) == 2048
    batch = make_batch([90, 7], [1, 1], 4, 2, HEAD_DIM, 8, seed=5)
    check(run_decode(batch, partition_size=16, block_n=16, max_partitions=2), batch, 2e-5)


def test_merge_walks_many_partitions():
    """40 partitions, more than the merge reads per step; some of them empty."""
    from colocate.kernels import merge_attention_partitions

    gen = torch.Generator().manual_seed(6)
    S, nh, P, hd = 2, 3, 40, 16
    part_out = torch.randn(S, nh, P, hd, generator=gen)
    part_max = torch.randn(S, nh, P, generator=gen) * 4
    part_sum = torch.rand(S, nh, P, generator=gen) + 0.5
    part_max[:, :, 30:] = float("-inf")                     # empty partitions weigh nothing
    part_sum[:, :, 30:] = 0.0
    w = torch.exp2(part_max - part_max.amax(-1, keepdim=True))             # (S, nh, P)
    want = (part_out * w[..., None]).sum(2) / (w * part_sum).sum(-1)[..., None]
    out = merge_attention_partitions(part_out, part_max, part_sum, torch.empty(S, nh, hd))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_prefill_mixed_batch_with_an_odd_group(kind):
    """One 33-token chunk after a prefix, three decodes, an empty chunk and a fresh
    prefill, with a GQA group of 3 (padded to 4 rows per query)."""
    dtype, kv_int8, atol = KINDS[kind]
    batch = make_batch([45, 9, 1, 17, 6, 5], [33, 1, 1, 1, 0, 5], 6, 2, HEAD_DIM, 8, dtype,
                       kv_int8, seed=7)
    check(run_prefill(batch), batch, atol)


def test_prefill_group_wider_than_block_m():
    """A group of 32 heads per KV head: one query per program, 32 rows."""
    batch = make_batch([20, 3], [4, 3], 32, 1, HEAD_DIM, 8, seed=8)
    check(run_prefill(batch, block_m=16), batch, 2e-5)
