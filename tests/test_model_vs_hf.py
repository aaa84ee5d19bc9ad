"""colocate's LLaMA over a paged KV cache gives HF transformers' logits, token for token.

Each prompt's HF logits come from one plain batch-1 forward. colocate then runs the
same prompts (a) all at once as one flat batch, and (b) as a schedule of prefill
chunks, continuing chunks and single-token decode steps, mixed across sequences, with
block tables made of shuffled, non-contiguous block ids.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches
from colocate.quant.loading import load_model
from colocate.model.tiny import write_tiny_checkpoint

PROMPT_LENS = [1, 5, 17, 64, 129, 300]
BLOCK_SIZE = 16
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from 2 threads, and on a 2-core machine shared
    with other jobs the second OpenMP thread's spin-waiting makes them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["tiny", "tiny-gqa"])
def models(request, tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), preset=request.param)
    ours = load_model(path, dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, hf


def make_prompts(lens: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lens]


def hf_logits(hf, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf(p[None]).logits[0] for p in prompts]                  # (L, V) each


def shuffled_block_tables(lens: list[int], seed: int = 1) -> tuple[list[list[int]], int]:
    """Each sequence's block ids, drawn without order from a pool with spare blocks."""
    need = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = 1 + sum(need) + 7                                       # block 0 is the null block
    ids = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(ids[at:at + n])
        at += n
    return tables, num_blocks


def build_step(pieces: list[tuple[int, int, int]], prompts: list[torch.Tensor],
               tables: list[list[int]]):
    """pieces: (seq, start position, n tokens) -> input_ids, positions, AttentionMetadata."""
    ids, pos, slots, qsl, seq_lens, rows = [], [], [], [0], [], []
    for s, start, n in pieces:
        p = torch.arange(start, start + n)
        ids.append(prompts[s][start:start + n])
        pos.append(p)
        blocks = torch.tensor(tables[s])
        slots.append(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        qsl.append(qsl[-1] + n)
        seq_lens.append(start + n)
        rows.append(tables[s])
    width = max(len(r) for r in rows)
    block_tables = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=qsl, seq_lens=seq_lens,
        block_tables=block_tables, block_size=BLOCK_SIZE,
        all_decode=all(n == 1 for _, _, n in pieces))
    return torch.cat(ids), torch.cat(pos), meta


def run_schedule(model, prompts, steps, kv_dtype=torch.float32) -> list[torch.Tensor]:
    """Run steps (lists of pieces) through one KV cache; return each prompt's logits (L, V)."""
    tables, num_blocks = shuffled_block_tables([len(p) for p in prompts])
    caches = allocate_kv_caches(model.config, num_blocks, BLOCK_SIZE, kv_dtype)
    out = [torch.empty(len(p), model.config.vocab_size) for p in prompts]
    for pieces in steps:
        input_ids, positions, meta = build_step(pieces, prompts, tables)
        logits = model.compute_logits(model(input_ids, positions, caches, meta))
        for i, (s, start, n) in enumerate(pieces):
            out[s][start:start + n] = logits[meta.query_start_loc[i]:meta.query_start_loc[i + 1]]
    return out


def chunked_schedule(lens: list[int], first: int = 40, chunk: int = 23):
    """Per sequence: a prefill chunk, continuing chunks, then single-token decode steps.

    Sequences are aligned to finish together and later ones decode for longer, so some
    steps mix one sequence's decode tokens with another's prefill chunk, and the last
    steps are pure decode over sequences of different lengths (the batched, masked path).
    """
    per_seq = []
    for s, n in enumerate(lens):
        tail = min(4 + 4 * s, n - 1)
        sizes = [min(first, n - tail)] if n - tail > 0 else []
        while sum(sizes) < n - tail:
            sizes.append(min(chunk, n - tail - sum(sizes)))
        sizes += [1] * tail
        per_seq.append(sizes)
    num_steps = max(len(s) for s in per_seq)
    steps: list[list[tuple[int, int, int]]] = [[] for _ in range(num_steps)]
    for s, sizes in enumerate(per_seq):
        start = 0
        for k, n in enumerate(sizes):
            steps[num_steps - len(sizes) + k].append((s, start, n))
            start += n
    return steps


def assert_matches(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = (a - b).abs().max().item()
        assert err <= ATOL, f"prompt {i} (len {len(b)}): max |logit diff| {err:.2e}"
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"prompt {i}: greedy tokens differ"


def test_one_flat_batch(models):
    ours, hf = models
    prompts = make_prompts(PROMPT_LENS, ours.config.vocab_size)
    step = [(s, 0, len(p)) for s, p in enumerate(prompts)]
    assert_matches(run_schedule(ours, prompts, [step]), hf_logits(hf, prompts))


def test_chunked_prefill_then_decode(models):
    ours, hf = models
    prompts = make_prompts(PROMPT_LENS, ours.config.vocab_size, seed=1)
    steps = chunked_schedule(PROMPT_LENS)
    kinds = {(any(n == 1 for *_, n in st), any(n > 1 for *_, n in st)) for st in steps}
    assert (True, True) in kinds and (True, False) in kinds, "schedule lost its mixed / decode steps"
    assert_matches(run_schedule(ours, prompts, steps), hf_logits(hf, prompts))


def test_single_sequence_decode(models):
    """Batch-1 decode takes the batched path with no mask; run it across block boundaries."""
    ours, hf = models
    prompts = make_prompts([70], ours.config.vocab_size, seed=2)
    steps = [[(0, 0, 20)]] + [[(0, p, 1)] for p in range(20, 70)]
    assert_matches(run_schedule(ours, prompts, steps), hf_logits(hf, prompts))


# Half precision cannot match fp32 to 1e-4; what it must do is round no worse than HF
# in the same dtype. Measured on tiny and tiny-gqa, prompts of 5-129 tokens, chunked:
# relative L2 distance of our bf16 logits from HF bf16's 0.9-1.1%, from HF fp32's
# within 0.9-1.0x HF bf16's own distance from HF fp32 (1.0-1.2%); fp16 0.11-0.13%
# against HF fp16's 0.12-0.14%. Bound: 1.5x HF's own rounding, on both.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_rounds_like_hf(models, dtype):
    _, hf32 = models
    path = hf32.name_or_path
    ours = load_model(path, dtype=dtype)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager").eval()
    prompts = make_prompts([5, 17, 64, 129], hf32.config.vocab_size)
    got = run_schedule(ours, prompts, chunked_schedule([len(p) for p in prompts]), dtype)
    for i, (g, h, f) in enumerate(zip(got, hf_logits(hf, prompts), hf_logits(hf32, prompts))):
        g, h = g.float(), h.float()                                      # (L, V) each

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        hf_rounding = rel(h, f)
        assert rel(g, h) <= 1.5 * hf_rounding, (i, rel(g, h), hf_rounding)
        assert rel(g, f) <= 1.5 * hf_rounding, (i, rel(g, f), hf_rounding)


def test_linear_rope_scaling_matches_hf(tmp_path):
    """rope_scaling {"rope_type": "linear"} (positions divided by the factor, as in
    LLaMA-2-based long-context fine-tunes) against HF on prompts past the original
    context, chunked."""
    import json

    path = write_tiny_checkpoint(tmp_path / "linear", preset="tiny")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    ours = load_model(path, dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    plain = load_model(write_tiny_checkpoint(tmp_path / "plain", preset="tiny"))
    prompts = make_prompts([17, 129], ours.config.vocab_size, seed=3)
    steps = chunked_schedule([len(p) for p in prompts])
    got = run_schedule(ours, prompts, steps)
    assert_matches(got, hf_logits(hf, prompts))
    # The scaling took effect: the same weights without it give other logits.
    assert not torch.allclose(got[1], run_schedule(plain, prompts, steps)[1], atol=1e-2)
