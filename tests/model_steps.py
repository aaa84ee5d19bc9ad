"""Drive the model through a fixed schedule of steps with hand-built AttentionMetadata.

Shared by the int8 KV tests and the kernel-path model test: the schedule covers a
fresh prefill, a chunk continuing a cached prefix, a mixed step (one sequence
prefilling while another decodes) and pure decode steps.
"""
from __future__ import annotations

import copy

import torch

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches

BLOCK_SIZE = 8
# Per step, per sequence: how many new tokens it brings (0: not scheduled).
SCHEDULE = [(9, 5), (4, 1), (1, 1), (1, 1)]
# Each sequence's blocks, in order; block 0 stays the null block.
BLOCKS = [[3, 1, 6], [2, 5, 4]]


def run_schedule(model, kv_dtype: torch.dtype, seed: int = 0, schedule=SCHEDULE,
                 caches_after: list | None = None) -> list[torch.Tensor]:
    """Logits (new tokens, vocab) of every step, token ids drawn from `seed`. With
    `caches_after`, a copy of every layer's cache is appended to it after each step."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    total = [sum(step[i] for step in schedule) for i in range(2)]
    tokens = [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in total]
    caches = allocate_kv_caches(config, 7, BLOCK_SIZE, kv_dtype)
    done = [0, 0]
    logits = []
    for step in schedule:
        ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
        tables = []
        for i, n in enumerate(step):
            if n == 0:
                continue
            p = torch.arange(done[i], done[i] + n)
            table = torch.tensor(BLOCKS[i])
            ids.append(tokens[i][p])
            pos.append(p)
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            qsl.append(qsl[-1] + n)
            seq_lens.append(done[i] + n)
            tables.append(table)
            done[i] += n
        meta = AttentionMetadata(slot_mapping=torch.cat(slots), query_start_loc=qsl,
                                 seq_lens=seq_lens, block_tables=torch.stack(tables),
                                 block_size=BLOCK_SIZE, all_decode=qsl[-1] == len(seq_lens))
        hidden = model(torch.cat(ids), torch.cat(pos), caches, meta)     # (T, H)
        logits.append(model.compute_logits(hidden))
        if caches_after is not None:
            caches_after.append(copy.deepcopy(caches))
    return logits
