"""What one forward step tells attention about the flat batch.

The batch is flat: the new tokens of S sequences stand one after another, with no
padding. Sequence i owns tokens query_start_loc[i] : query_start_loc[i+1] of the
batch; they sit at positions seq_lens[i] - query_len .. seq_lens[i] - 1 of that
sequence, whose earlier tokens are already in the KV cache.

KV cache layout, one pair of tensors per layer (the model runner owns them):
    key_cache, value_cache: (num_blocks, block_size, num_kv_heads, head_dim)
Block 0 is the null block: it is never handed to a request and pads block tables.
A token's slot is block_id * block_size + offset inside the block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # (T,) int64: where each new token's K/V goes
    query_start_loc: list[int]       # S + 1 offsets into the flat batch
    seq_lens: list[int]              # (S,) context length after this step, per sequence
    block_tables: torch.Tensor       # (S, max_blocks) int64, padded with the null block 0
    block_size: int
    # True when every sequence contributes exactly one token (pure decode step):
    # attention may then take a batched path instead of a per-sequence loop.
    all_decode: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    def context_len(self, i: int) -> int:
        """Tokens of sequence i already cached before this step."""
        return self.seq_lens[i] - self.query_len(i)


def select_sequences(meta: AttentionMetadata,
                     seqs: list[int]) -> tuple[AttentionMetadata, list[int]]:
    """The metadata of sequences `seqs` (indices into meta, in order) as a batch of their
    own, and the flat rows of meta's batch that their tokens are."""
    rows: list[int] = []
    query_start_loc = [0]
    for i in seqs:
        rows.extend(range(meta.query_start_loc[i], meta.query_start_loc[i + 1]))
        query_start_loc.append(len(rows))
    index = torch.tensor(rows, dtype=torch.long, device=meta.slot_mapping.device)
    picked = torch.tensor(seqs, dtype=torch.long, device=meta.block_tables.device)
    sub = AttentionMetadata(
        slot_mapping=meta.slot_mapping.index_select(0, index),
        query_start_loc=query_start_loc,
        seq_lens=[meta.seq_lens[i] for i in seqs],
        block_tables=meta.block_tables.index_select(0, picked),
        block_size=meta.block_size,
        all_decode=len(rows) == len(seqs))
    return sub, rows
