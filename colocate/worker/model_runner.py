"""ModelRunner: turns a scheduler output into tensors, runs the model, samples.

It owns the KV cache tensors and each request's random generator. It reads the
requests the scheduler chose but changes none of them; the engine applies the
results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.engine.scheduler import SchedulerOutput
from colocate.model.attention_metadata import AttentionMetadata, select_sequences
from colocate.model.kv_memory import KVCacheMemory
from colocate.model.model_config import LlamaConfig
from colocate.worker.cpu_decode import CpuDecodePlan
from colocate.worker.sampler import (SampleResult, Sampler, SamplingRow, make_generator,
                                     prompt_logprobs)


MixedStep = tuple[tuple[AttentionMetadata, list[int]], tuple[AttentionMetadata, list[int]]]


def split_mixed_step(meta: AttentionMetadata) -> MixedStep | None:
    """(decodes, chunks) of a batch with both: each the metadata of its sequences as a
    batch of their own and their rows in the whole batch; None unless the batch has
    both. A one-token prompt chunk counts as a decode: it is one, shaped so."""
    one = [i for i in range(meta.num_seqs) if meta.query_len(i) == 1]
    more = [i for i in range(meta.num_seqs) if meta.query_len(i) > 1]
    if not one or not more:
        return None
    return select_sequences(meta, one), select_sequences(meta, more)


@dataclass
class StepResult:
    sample: SampleResult | None = None           # the next token, when the step reached the end
    prompt_logprobs: list[float] | None = None   # for this chunk's prompt tokens, in order


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: LlamaConfig, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None, *, kv_shared_file: str | None = None,
                 kv_own_blocks: tuple[int, int] | None = None) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        # kv_dtype: the cache's storage dtype, torch.int8 for a quantized cache; None: `dtype`.
        self.kv_memory = KVCacheMemory(config.num_hidden_layers, num_blocks, block_size,
                                       config.num_key_value_heads, config.head_dim,
                                       kv_dtype or dtype, device,
                                       # An isolated lending circle's one pool file.
                                       shared_file=kv_shared_file, own_blocks=kv_own_blocks)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator | None] = {}
        # Planned at the first CPU forward (the weights are final by then); None after
        # that where the C decode step does not cover the model.
        self._decode_plan: CpuDecodePlan | None | bool = False

    @property
    def kv_caches(self):
        return self.kv_memory.caches

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # A sleeping engine gives its pool back and takes a fresh, zeroed one to wake.
    def free_kv_cache(self) -> None:
        """Every pool of the cache sleeps: unmap it, and give back the weights' pages
        where the model's copy allows it (`weight_pages`, set by the weight store for a
        CPU service's disk-backed copy: colocate/memory/weight_pages.py)."""
        self.kv_memory.release()
        pages = getattr(self.model, "weight_pages", None)
        if pages is not None:
            pages.release()

    def allocate_kv_cache(self, resident: bool = True) -> None:
        pages = getattr(self.model, "weight_pages", None)
        if pages is not None and not self.kv_memory.allocated:
            pages.prefetch()                  # waking: read the weights back ahead
        self.kv_memory.allocate(resident)

    # A member of a fused group sleeps alone on a block range of the one cache.
    @property
    def can_drop_kv_blocks(self) -> bool:
        return self.kv_memory.can_drop_blocks

    def drop_kv_blocks(self, first: int, count: int) -> int:
        return self.kv_memory.drop_blocks(first, count)

    def zero_kv_blocks(self, first: int, count: int) -> None:
        self.kv_memory.zero_blocks(first, count)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, StepResult]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []          # flat index of the token whose logits sample
        prompt_rows: list[tuple[int, int, int]] = []   # (request index, first row, count)
        bs = self.block_size
        for idx, s in enumerate(sched.scheduled):
            req = s.request
            start, n = req.num_computed_tokens, s.num_new_tokens
            base = len(input_ids)
            input_ids.extend(req.all_token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            query_start_loc.append(base + n)
            seq_lens.append(start + n)
            if s.samples:
                sample_rows.append(base + n - 1)
            if req.sampling_params.wants_prompt_logprobs:
                # Row p predicts token p + 1; keep the rows that predict prompt tokens.
                last = min(start + n, req.num_prompt_tokens - 1)
                if last > start:
                    prompt_rows.append((idx, base, last - start))

        # Padded with the null block 0 in Python, so the table is one tensor
        # construction per step rather than one per sequence.
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        block_tables = torch.tensor(
            [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in sched.scheduled],
            dtype=torch.long)                                                   # (S, max_blocks)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables.to(self.device),
            block_size=bs,
            all_decode=len(input_ids) == len(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)     # (T,)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)   # (T,)
        hidden = self._forward(ids, pos_t, meta)                                 # (T, H)

        results: dict[str, StepResult] = {
            s.request.request_id: StepResult() for s in sched.scheduled}
        self._prompt_logprobs(sched, hidden, prompt_rows, results)
        if sample_rows:
            self._sample(sched, hidden, sample_rows, results)
        return results

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        plan = self._cpu_decode_plan()
        if plan is not None and plan.covers_cache(self.kv_caches):
            if meta.all_decode:
                return plan.forward(ids, positions, self.kv_caches, meta)
            mixed = split_mixed_step(meta)
            if mixed is not None:
                return self._mixed_forward(plan, ids, positions, meta, mixed)
        return self.model(ids, positions, self.kv_caches, meta)

    def _cpu_decode_plan(self) -> CpuDecodePlan | None:
        """Planned at the first forward that could use it (the weights are final by then)."""
        if self.device.type != "cpu":
            return None
        if self._decode_plan is False:
            self._decode_plan = CpuDecodePlan.build(self.model)
        return self._decode_plan

    def _mixed_forward(self, plan: CpuDecodePlan, ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata, mixed: MixedStep) -> torch.Tensor:
        """A step of decodes and prompt chunks: the decodes through the C decode step,
        the chunks through the model, each sequence's rows where the batch has them.
        One forward over all of them would send the decodes through the chunks' torch
        attention, a gather and an SDPA call per sequence and layer."""
        (dmeta, drows), (pmeta, prows) = mixed
        d = torch.tensor(drows, dtype=torch.long, device=self.device)           # (Sd,)
        p = torch.tensor(prows, dtype=torch.long, device=self.device)           # (Tp,)
        decoded = plan.forward(ids[d], positions[d], self.kv_caches, dmeta)      # (Sd, H)
        out = self.model(ids[p], positions[p], self.kv_caches, pmeta)            # (Tp, H)
        hidden = out.new_empty(ids.shape[0], out.shape[1])                      # (T, H)
        return hidden.index_copy_(0, d, decoded).index_copy_(0, p, out)

    def _sample(self, sched, hidden, sample_rows, results) -> None:
        sampling = [s for s in sched.scheduled if s.samples]
        logits = self.model.compute_logits(hidden[sample_rows])                 # (N, V)
        rows = []
        for s in sampling:
            req = s.request
            rid = req.request_id
            if rid not in self.generators:
                self.generators[rid] = make_generator(req.sampling_params.seed, self.device)
            rows.append(SamplingRow(
                params=req.sampling_params, generator=self.generators[rid],
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=req.output_token_ids,
                stop_token_ids=req.stop_token_ids))
        for s, sample in zip(sampling, self.sampler.sample(logits, rows)):
            results[s.request.request_id].sample = sample

    def _prompt_logprobs(self, sched, hidden, prompt_rows, results) -> None:
        for idx, first, count in prompt_rows:
            req = sched.scheduled[idx].request
            start = req.num_computed_tokens
            logits = self.model.compute_logits(hidden[first:first + count])     # (count, V)
            targets = torch.tensor(req.prompt_token_ids[start + 1:start + 1 + count],
                                   dtype=torch.long, device=logits.device)
            results[req.request_id].prompt_logprobs = prompt_logprobs(logits, targets)
