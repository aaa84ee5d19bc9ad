"""The engine on the SmolLM2 GGUF against HF transformers loading the same file
(`gguf_file=`), float32: greedy chat replies identical token for token, top-5
log-probabilities within 1e-4, LLM.chat equal to apply_chat_template + generate."""
from __future__ import annotations

import pytest
import torch

from colocate import LLM, SamplingParams
from tests.gguf.conftest import CHAT_QUESTIONS

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_replies(hf_smollm2):
    """Per question: the prompt ids HF's template gives, HF's greedy reply, and the
    log-softmax of every step that chose it."""
    model, tok = hf_smollm2
    out = []
    with torch.no_grad():
        for q in CHAT_QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            reply = gen.sequences[0, len(ids):].tolist()
            # generate()'s scores are the raw logits of each step (greedy: no warpers).
            logprobs = [torch.log_softmax(s[0].float(), -1) for s in gen.scores]
            out.append((ids, reply, logprobs))
    return out


@pytest.fixture(scope="module")
def llm_float(smollm2_gguf):
    return LLM(str(smollm2_gguf), dtype="float32", quantization="none")


def test_greedy_chat_replies_match_hf(llm_float, hf_replies):
    prompts = [ids for ids, _, _ in hf_replies]
    outs = llm_float.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                      logprobs=5))
    assert any(o.finish_reason == "stop" for o in outs)     # some replies end at <|im_end|>
    for q, o, (_, reply, logprobs) in zip(CHAT_QUESTIONS, outs, hf_replies):
        # HF keeps the EOS it stopped on; the engine reports it as the last token too.
        assert o.token_ids == reply, q
        for step, top in enumerate(o.logprobs):
            hf_top = torch.topk(logprobs[step], 5)
            assert set(hf_top.indices.tolist()) <= set(top), (q, step)
            for tid in hf_top.indices.tolist():
                assert abs(top[tid] - float(logprobs[step][tid])) < 1e-4, (q, step, tid)


def test_first_reply_is_english(llm_float):
    out = llm_float.chat([{"role": "user", "content": CHAT_QUESTIONS[0]}],
                         SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_chat_equals_hf_apply_chat_template_and_generate(llm_float, hf_smollm2, hf_replies):
    _, tok = hf_smollm2
    conversations = [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS[:4]]
    outs = llm_float.chat(conversations, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for o, (ids, reply, _) in zip(outs, hf_replies):
        assert o.prompt_token_ids == ids
        assert o.token_ids == reply
        assert o.text == tok.decode(reply, skip_special_tokens=True)


def test_system_and_multi_turn_prompts_render_like_hf(llm_float, hf_smollm2):
    _, tok = hf_smollm2
    conv = [{"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "Ça va ? 42 ✓"}]
    for gen_prompt in (True, False):
        expect = tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
        expect = list(expect["input_ids"] if hasattr(expect, "keys") else expect)
        assert llm_float.tokenizer.apply_chat_template(conv, gen_prompt) == expect


def test_tokenizer_matches_hf_on_mixed_text(llm_float, hf_smollm2):
    _, tok = hf_smollm2
    for text in ["In 1984, 12345 people ate 3.14 pies!", "  spaces\tand\n\nnewlines ",
                 "naïve café 日本語 🤖", "<|im_start|>user\nhi<|im_end|>", "don't we'll"]:
        assert llm_float.tokenizer.encode(text) == tok.encode(text), text
        ids = tok.encode(text)
        assert llm_float.tokenizer.decode(ids, False) == tok.decode(ids), text
