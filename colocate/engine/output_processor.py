"""Turns sampled tokens into text and decides when a request stops.

Per request it keeps an incremental detokenizer and how much text has been
handed out. While stop strings are armed, the last few characters are held back:
they might turn out to be the start of a stop string that must not be shown.
"""
from __future__ import annotations

from colocate.engine.outputs import RequestOutput
from colocate.engine.request import FinishReason, Request


class RequestTextState:
    def __init__(self, request: Request, tokenizer) -> None:
        params = request.sampling_params
        self.detokenizer = None
        if tokenizer is not None:
            from colocate.model.tokenizer import IncrementalDetokenizer

            self.detokenizer = IncrementalDetokenizer(
                tokenizer, request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        self.emitted_len = 0
        self.emitted_tokens = 0
        self.hold_back = max((len(s) for s in params.stop_strings), default=1) - 1


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.states: dict[str, RequestTextState] = {}

    def add(self, request: Request) -> None:
        self.states[request.request_id] = RequestTextState(request, self.tokenizer)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def on_token(self, request: Request, token_id: int) -> None:
        """Record one sampled token (already appended to the request) and finish
        the request if it stops here."""
        state = self.states[request.request_id]
        params = request.sampling_params
        new_text = state.detokenizer.push(token_id) if state.detokenizer else ""
        n_out = request.num_output_tokens
        past_min = n_out >= params.min_tokens
        if past_min and params.stop_strings and new_text:
            self._check_stop_strings(request, state, new_text)
        else:
            # A stop token's text stays (vLLM's rule); EOS, being special, decodes to "".
            state.text += new_text
        if request.is_finished:
            return
        if past_min and token_id in request.stop_token_ids:
            request.finish(FinishReason.STOP, stop_reason=token_id)
        elif n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            request.finish(FinishReason.LENGTH)

    def _check_stop_strings(self, request: Request, state: RequestTextState,
                            new_text: str) -> None:
        params = request.sampling_params
        # A stop string may straddle the old text and the new piece: search from
        # far enough back to catch it, but only where it could end in new_text.
        search_from = max(0, len(state.text) - state.hold_back)
        state.text += new_text
        for stop in params.stop_strings:
            at = state.text.find(stop, search_from)
            if at >= 0:
                end = at + len(stop) if params.include_stop_str_in_output else at
                state.text = state.text[:end]
                request.finish(FinishReason.STOP, stop_reason=stop)
                return

    def make_output(self, request: Request) -> RequestOutput:
        """This step's output: new tokens and the text now safe to show."""
        state = self.states[request.request_id]
        finished = request.is_finished
        safe_len = len(state.text) if finished or not request.sampling_params.stop_strings \
            else max(state.emitted_len, len(state.text) - state.hold_back)
        new_text = state.text[state.emitted_len:safe_len]
        state.emitted_len = safe_len
        new_tokens = request.output_token_ids[state.emitted_tokens:]
        state.emitted_tokens = request.num_output_tokens
        params = request.sampling_params
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=state.text[:safe_len],
            finished=finished,
            finish_reason=str(request.finish_reason) if request.finish_reason else None,
            stop_reason=request.stop_reason,
            new_token_ids=list(new_tokens),
            new_text=new_text,
            logprobs=list(request.logprobs) if params.logprobs is not None else None,
            prompt_logprobs=(list(request.prompt_logprobs)
                             if params.wants_prompt_logprobs else None),
            num_cached_tokens=request.num_cached_tokens,
        )
