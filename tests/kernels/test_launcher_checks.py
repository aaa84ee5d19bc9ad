"""Every launcher refuses bad arguments with a ValueError naming the argument, before
any kernel runs."""
from __future__ import annotations

import pytest
import torch

from colocate.kernels import (merge_attention_partitions, paged_decode_attention,
                              paged_prefill_attention, reshape_and_cache)

NB, BS, NKV, HD, S = 4, 8, 2, 16, 2


def _cache(dtype=torch.float32):
    return torch.zeros(NB, BS, NKV, HD, dtype=dtype)


def _decode_args(**over):
    args = dict(q=torch.randn(S, 4, HD), key_cache=_cache(), value_cache=_cache(),
                block_tables=torch.ones(S, 2, dtype=torch.long),
                seq_lens=torch.tensor([3, 9]), scale=0.25)
    args.update(over)
    return args


def _prefill_args(**over):
    args = dict(q=torch.randn(5, 4, HD), key_cache=_cache(), value_cache=_cache(),
                block_tables=torch.ones(S, 2, dtype=torch.long),
                query_start_loc=torch.tensor([0, 2, 5]), seq_lens=torch.tensor([3, 9]),
                max_query_len=3, scale=0.25)
    args.update(over)
    return args


def _cache_args(**over):
    args = dict(key=torch.randn(3, NKV, HD), value=torch.randn(3, NKV, HD),
                key_cache=_cache(), value_cache=_cache(), slot_mapping=torch.tensor([1, 2, 3]))
    args.update(over)
    return args


SCALES = dict(key_scale=torch.zeros(NB, BS, NKV), value_scale=torch.zeros(NB, BS, NKV))

DECODE_CASES = {
    "q": dict(q=torch.randn(S, 4, HD).to(torch.int32)),
    "key_cache": dict(key_cache=torch.zeros(NB, BS, NKV, HD + 1)),
    "value_cache": dict(value_cache=torch.zeros(NB, BS, NKV, HD).transpose(0, 1)),
    "block_tables": dict(block_tables=torch.ones(S, 2)),
    "seq_lens": dict(seq_lens=torch.tensor([3, 9, 1])),
    "key_scale": dict(key_cache=_cache(torch.int8), value_cache=_cache(torch.int8)),
    "KV heads": dict(q=torch.randn(S, 3, HD)),
    "max_seq_len": dict(max_seq_len=17),
    "partition_size": dict(partition_size=24, block_n=16),
    "out": dict(out=torch.empty(S, 4, HD, dtype=torch.float16)),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_rejects(name):
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**_decode_args(**DECODE_CASES[name]))


PREFILL_CASES = {
    "query_start_loc": dict(query_start_loc=torch.tensor([0, 5])),
    "max_query_len": dict(max_query_len=6),
    "block_m": dict(block_m=8),
    "key_cache dtype": dict(key_cache=_cache(torch.float16), value_cache=_cache(torch.float16)),
    "key_scale": dict(key_scale=SCALES["key_scale"]),
}


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_rejects(name):
    with pytest.raises(ValueError, match=name):
        paged_prefill_attention(**_prefill_args(**PREFILL_CASES[name]))


CACHE_CASES = {
    "value": dict(value=torch.randn(3, NKV, HD + 1)),
    "slot_mapping": dict(slot_mapping=torch.tensor([1.0, 2.0, 3.0])),
    "key_cache": dict(key_cache=torch.zeros(NB, BS, NKV + 1, HD)),
    "value_scale": dict(key_cache=_cache(torch.int8), value_cache=_cache(torch.int8),
                        key_scale=SCALES["key_scale"], value_scale=torch.zeros(NB, BS, NKV + 1)),
    "key": dict(key=torch.randn(3, NKV, 2 * HD)[:, :, ::2]),          # head dim not contiguous
}


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_reshape_and_cache_rejects(name):
    with pytest.raises(ValueError, match=name):
        reshape_and_cache(**_cache_args(**CACHE_CASES[name]))


def test_merge_rejects_mismatched_partials():
    with pytest.raises(ValueError, match="part_sum"):
        merge_attention_partitions(torch.zeros(2, 4, 3, 16), torch.zeros(2, 4, 3),
                                   torch.zeros(2, 4, 2), torch.empty(2, 4, 16))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        paged_decode_attention(**_decode_args())
