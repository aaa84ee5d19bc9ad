"""OpenAI's HTTP API, the answer side: the engine's RequestOutputs -> the JSON of a
chat completion or a text completion, whole or as stream chunks.

Shapes follow OpenAI's reference (and so what its SDK parses): `chat.completion` /
`chat.completion.chunk` with `message` / `delta`, `text_completion` with `text`;
`usage` with total_tokens and prompt_tokens_details.cached_tokens; logprobs as
`{"content": [{token, logprob, bytes, top_logprobs}]}` for chat and as the legacy
`{tokens, token_logprobs, top_logprobs, text_offset}` for completions.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

from colocate.engine.outputs import RequestOutput

TokenText = Callable[[int], str]      # one token id -> its text, special tokens kept


class ReplyWriter:
    """The answer to one request: feed it each RequestOutput (a step's delta) and
    take the chunks to stream, or, at the end, the whole answer."""

    def __init__(self, chat: bool, model: str, token_text: TokenText, top_logprobs: int | None):
        self.chat, self.model, self.token_text = chat, model, token_text
        self.top = top_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.text_offset = 0                  # completions' logprobs count characters
        self._sent_role = False

    # ---- streaming -----------------------------------------------------------------
    def chunk(self, out: RequestOutput) -> dict | None:
        """The stream chunk for one delta (None when it carries nothing to say)."""
        n_new = len(out.new_token_ids)
        logprobs = self._logprobs(out.new_token_ids, out.logprobs[-n_new:]
                                  if out.logprobs is not None and n_new else None)
        if not (out.new_text or out.finished or logprobs or not self._sent_role):
            return None
        reason = _finish_reason(out)
        if self.chat:
            delta = {"content": out.new_text}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": out.new_text, "logprobs": logprobs,
                      "finish_reason": reason}
        return self._envelope(f"{self.object}.chunk" if self.chat else self.object, [choice])

    def usage_chunk(self, final: RequestOutput) -> dict:
        """stream_options.include_usage: one last chunk, no choices, the usage."""
        body = self._envelope(f"{self.object}.chunk" if self.chat else self.object, [])
        body["usage"] = usage(final)
        return body

    # ---- whole -----------------------------------------------------------------------
    def whole(self, final: RequestOutput) -> dict:
        logprobs = self._logprobs(final.token_ids, final.logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text},
                      "logprobs": logprobs, "finish_reason": _finish_reason(final)}
        else:
            choice = {"index": 0, "text": final.text, "logprobs": logprobs,
                      "finish_reason": _finish_reason(final)}
        body = self._envelope(self.object, [choice])
        body["usage"] = usage(final)
        return body

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def _logprobs(self, token_ids: list[int], per_token: list[dict[int, float]] | None):
        if self.top is None or not per_token:
            return None
        if self.chat:
            return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, per_token)]}
        texts = [self.token_text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {"tokens": texts,
                "token_logprobs": [_finite(lp[t]) for t, lp in zip(token_ids, per_token)],
                "top_logprobs": [{self.token_text(i): _finite(v) for i, v in self._best(lp)}
                                 for lp in per_token],
                "text_offset": offsets}

    def _chat_entry(self, token_id: int, entry: dict[int, float]) -> dict:
        return {**self._token(token_id, entry[token_id]),
                "top_logprobs": [self._token(i, v) for i, v in self._best(entry)]}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def _best(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        # The sampler gives the k most likely plus the sampled one; OpenAI lists k.
        return sorted(entry.items(), key=lambda kv: -kv[1])[:self.top]


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; OpenAI writes an impossible token's logprob as -9999.
    return logprob if math.isfinite(logprob) else -9999.0


def usage(final: RequestOutput) -> dict:
    prompt, completion = len(final.prompt_token_ids), len(final.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens}}


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def model_list(names: list[str], owner: str) -> dict:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": owner}
                     for name in names]}
