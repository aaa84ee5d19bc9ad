"""The engines bench/decode.py measures, behind one small interface.

ttft(prompt) generates one token; decode(prompts, n) generates n tokens for every
prompt together and returns (start time, arrival events as common.decode_rate takes
them, tokens per prompt). Each tells num_params, weight_bytes (held),
weight_bytes_per_token (read by a batch-1 decode step) and max_batch (the largest
batch its offline API runs together).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common import StepTimes, bytes_read_per_token, unique_bytes


def is_gguf(model: str) -> bool:
    return Path(model).is_file()


class ColocateEngine:
    max_batch = 1 << 30

    def __init__(self, model_dir: str, mode: Mode, settings: Settings) -> None:
        from colocate import LLM, SamplingParams
        from colocate.quant import linear_bytes, weight_bytes
        if mode.quantization is None and not is_gguf(model_dir):
            raise ValueError("the checkpoint stores floats: as stored is colocate-fp32")
        self.name = mode.name
        self._params = SamplingParams
        block = 16
        # Room for the largest batch at full length plus one partly used block per
        # sequence, and for the longest TTFT prompt; never a preemption.
        per_seq = settings.decode_prompt_len + settings.decode_new_tokens + block
        kv_tokens = max(settings.max_batch * per_seq, max(settings.ttft_prompt_lens) + 2 * block)
        # Every prefill of the run fits one step, so prefill is never chunked.
        batched = max(4096, max(settings.ttft_prompt_lens),
                      settings.max_batch * settings.decode_prompt_len)
        # Prefix caching off: TTFT must time a prefill, not a cache lookup (the prompts
        # differ per call too; this makes sure).
        self.llm = LLM(model=model_dir, dtype=mode.dtype, quantization=mode.quantization,
                       quant_group_size=mode.quant_group_size,
                       kv_cache_dtype=mode.kv_cache_dtype, block_size=block,
                       kv_cache_tokens=kv_tokens, max_num_seqs=settings.max_batch,
                       max_num_batched_tokens=batched, enable_prefix_caching=False)
        model = self.llm.model
        self.vocab_size = self.llm.config.vocab_size
        self.info = {"kv_cache_tokens": kv_tokens, "max_num_seqs": settings.max_batch,
                     "max_num_batched_tokens": batched, "enable_prefix_caching": False}
        # weight_bytes counts the quantized linears' buffers; model.weight_bytes() would
        # count parameters only.
        self.weight_bytes = weight_bytes(model)
        self.weight_bytes_per_token = bytes_read_per_token(
            self.weight_bytes, model.model.embed_tokens.weight, tied=model.lm_head is None)
        self.num_params = sum(p.numel() for p in model.parameters()) + sum(
            lb.parameters for lb in linear_bytes(model) if lb.kind != "float")

    def _greedy(self, n: int):
        return self._params(max_tokens=n, temperature=0.0, ignore_eos=True)

    def ttft(self, prompt: list[int]) -> None:
        self.llm.generate([prompt], self._greedy(1))

    def decode(self, prompts: list[list[int]], new_tokens: int):
        # Drive the engine step by step (what LLM.generate does inside) so each step's
        # tokens get a timestamp as they come out.
        engine = self.llm.engine
        params = self._greedy(new_tokens)
        start = time.perf_counter()
        index = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
        tokens: list[list[int]] = [[] for _ in prompts]
        events, unfinished = [], len(prompts)
        while unfinished:
            if not engine.has_unfinished_requests():
                raise RuntimeError("engine went idle before every request finished")
            outputs = engine.step()
            now = time.perf_counter()
            arrived = 0
            for out in outputs:
                tokens[index[out.request_id]].extend(out.new_token_ids)
                arrived += len(out.new_token_ids)
                unfinished -= out.finished
            if arrived:
                events.append((now, arrived, sum(1 for t in tokens if t)))
        return start, events, tokens

    def close(self) -> None:
        del self.llm


class HFEngine:
    max_batch = 1 << 30

    def __init__(self, model_dir: str, mode: Mode, settings: Settings) -> None:
        import transformers
        self.name = mode.name
        where = ({"pretrained_model_name_or_path": str(Path(model_dir).parent),
                  "gguf_file": Path(model_dir).name} if is_gguf(model_dir)
                 else {"pretrained_model_name_or_path": model_dir})
        self.model = transformers.LlamaForCausalLM.from_pretrained(
            **where, dtype=getattr(torch, mode.dtype)).eval()
        config = self.model.config
        self.vocab_size = config.vocab_size
        eos = config.eos_token_id
        self._pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
        self.info = {"attn_implementation": config._attn_implementation}
        self.weight_bytes = unique_bytes(self.model.parameters())
        self.weight_bytes_per_token = bytes_read_per_token(
            self.weight_bytes, self.model.get_input_embeddings().weight,
            tied=bool(config.tie_word_embeddings))
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def _generate(self, prompts: list[list[int]], new_tokens: int, streamer=None):
        # The prompts of one call have equal lengths, so left padding adds nothing; the
        # all-ones mask is passed anyway, as a batch of mixed lengths would need it.
        ids = torch.tensor(prompts)
        # min_new_tokens == max_new_tokens: both engines generate exactly n tokens
        # whatever the model thinks of EOS.
        return self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=self._pad,
            streamer=streamer)

    def ttft(self, prompt: list[int]) -> None:
        self._generate([prompt], 1)

    def decode(self, prompts: list[list[int]], new_tokens: int):
        arrivals = StepTimes()
        start = time.perf_counter()
        out = self._generate(prompts, new_tokens, arrivals)
        batch = len(prompts)
        events = [(t, batch, batch) for t in arrivals.times]
        return start, events, out[:, len(prompts[0]):].tolist()

    def close(self) -> None:
        del self.model


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python (the `bench` extra), on the GGUF as stored, with
    torch's thread count. Its offline API decodes one sequence at a time (its server
    batches with --n_parallel), so it runs batch 1 only."""
    max_batch = 1

    def __init__(self, model_dir: str, mode, settings) -> None:
        if not is_gguf(model_dir):
            raise ValueError("llama.cpp reads a GGUF file; this model is a directory")
        try:
            import llama_cpp
        except ImportError as exc:
            raise ValueError(f"llama-cpp-python is not installed (pip install -e '.[bench]'): "
                             f"{exc}") from None
        from colocate.model.gguf_file import GGUFFile

        self.name = mode.name
        threads = torch.get_num_threads()
        n_ctx = max(max(settings.ttft_prompt_lens),
                    settings.decode_prompt_len + settings.decode_new_tokens) + 16
        self.llm = llama_cpp.Llama(model_path=model_dir, n_ctx=n_ctx, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.info = {"llama_cpp_version": llama_cpp.__version__, "n_threads": threads}
        import math

        tensors = GGUFFile(model_dir).tensors
        self.weight_bytes = sum(t.data.nbytes for t in tensors.values())
        # A step reads every tensor once, but of the input embedding one row only,
        # unless it is also the output head (no output.weight): then all of it.
        embed = tensors["token_embd.weight"]
        tied = "output.weight" not in tensors
        self.weight_bytes_per_token = self.weight_bytes - (0 if tied else embed.data.nbytes)
        self.num_params = sum(math.prod(t.shape) for t in tensors.values())

    def _tokens(self, prompt: list[int], n: int):
        # reset=True and a fresh random prompt per call: nothing is reused from the cache.
        gen = self.llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        for _ in range(n):
            yield next(gen)

    def ttft(self, prompt: list[int]) -> None:
        list(self._tokens(prompt, 1))

    def decode(self, prompts: list[list[int]], new_tokens: int):
        if len(prompts) != 1:
            raise ValueError("llama.cpp's offline API decodes one sequence at a time")
        start, events, tokens = time.perf_counter(), [], []
        for token in self._tokens(prompts[0], new_tokens):
            tokens.append(token)
            events.append((time.perf_counter(), 1, 1))
        return start, events, [tokens]

    def close(self) -> None:
        self.llm.close()
        del self.llm


ENGINES = {"colocate": ColocateEngine, "hf": HFEngine, "llamacpp": LlamaCppEngine}
