"""The whole engine against HF transformers on the same checkpoint, float32:
greedy tokens identical for a batch of prompts of lengths 1 to 300, under forced
chunked prefill, under preemption and with prefix-cache hits; prompt and
generated log-probabilities equal HF's log-softmax."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from colocate import LLM, SamplingParams


PROMPT_LENGTHS = [1, 2, 7, 16, 33, 100, 177, 300]
NEW_TOKENS = 12


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(n - 1)] for n in PROMPT_LENGTHS]


def greedy(max_tokens=NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


class Reference:
    """HF's greedy continuation and log-probabilities, computed once per checkpoint."""

    def __init__(self, model_dir):
        self.hf = transformers.LlamaForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
        self.vocab = self.hf.config.vocab_size
        self.prompts = make_prompts(self.vocab)
        self.tokens = []
        self.logits = []          # (len(prompt) + NEW_TOKENS - 1, V) per prompt
        with torch.no_grad():
            for p in self.prompts:
                # A plain argmax loop: HF's generate() would suppress EOS under
                # min_new_tokens, while the engine here runs with ignore_eos.
                seq = list(p)
                for _ in range(NEW_TOKENS):
                    logits = self.hf(torch.tensor([seq])).logits[0]            # (L, V)
                    seq.append(int(logits[-1].argmax()))
                self.tokens.append(seq[len(p):])
                self.logits.append(self.hf(torch.tensor([seq])).logits[0, :-1])


@pytest.fixture(scope="module", params=["tiny", "tiny-gqa"])
def ref(request, tiny_model_dir, tiny_gqa_model_dir):
    model_dir = tiny_model_dir if request.param == "tiny" else tiny_gqa_model_dir
    return model_dir, Reference(model_dir)


def check_tokens(outs, reference):
    for i, (o, expect) in enumerate(zip(outs, reference.tokens)):
        assert o.token_ids == expect, f"prompt {i} (length {PROMPT_LENGTHS[i]}) diverged"


def test_greedy_batch_matches_hf(ref):
    model_dir, reference = ref
    llm = LLM(str(model_dir), dtype="float32")
    check_tokens(llm.generate(reference.prompts, greedy()), reference)


def test_chunked_prefill_matches_hf(ref):
    model_dir, reference = ref
    llm = LLM(str(model_dir), max_num_batched_tokens=32)
    check_tokens(llm.generate(reference.prompts, greedy()), reference)


def test_preemption_matches_hf(ref):
    model_dir, reference = ref
    # 44 blocks of 16 tokens: the longest request alone needs 20, all together 56.
    llm = LLM(str(model_dir), kv_cache_tokens=44 * 16, max_num_batched_tokens=512)
    check_tokens(llm.generate(reference.prompts, greedy()), reference)
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_match_hf(ref):
    model_dir, reference = ref
    llm = LLM(str(model_dir))
    llm.generate(reference.prompts, greedy(max_tokens=1))
    outs = llm.generate(reference.prompts, greedy())
    check_tokens(outs, reference)
    hits = [o.num_cached_tokens for o in outs]
    assert sum(hits) > 0 and llm.engine.kv.prefix_hits > 0
    # Every prompt with at least one full block before its last token hit it.
    for n, h in zip(PROMPT_LENGTHS, hits):
        assert h == ((n - 1) // 16) * 16


def test_prompt_logprobs_match_hf(ref):
    model_dir, reference = ref
    llm = LLM(str(model_dir), max_num_batched_tokens=64)
    outs = llm.generate(reference.prompts, greedy(max_tokens=2, prompt_logprobs=True))
    for p, o, logits in zip(reference.prompts, outs, reference.logits):
        assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        hf = torch.log_softmax(logits[:len(p) - 1], dim=-1)           # (n - 1, V)
        hf = hf.gather(1, torch.tensor(p[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.prompt_logprobs[1:]), hf, atol=1e-4)


def test_generated_logprobs_match_hf(ref):
    model_dir, reference = ref
    llm = LLM(str(model_dir))
    outs = llm.generate(reference.prompts[:4], greedy(logprobs=3))
    for p, o, logits in zip(reference.prompts, outs, reference.logits):
        hf = torch.log_softmax(logits[len(p) - 1:], dim=-1)           # (NEW_TOKENS, V)
        for step, top in enumerate(o.logprobs):
            expect = torch.topk(hf[step], 3)
            assert set(top) == set(expect.indices.tolist())
            for tok, lp in top.items():
                assert abs(lp - hf[step, tok].item()) < 1e-4
