"""Turns sampled tokens into text, and stops a request on a stop string.

Per request it keeps an incremental detokenizer and how much text has been
handed out. While stop strings are armed, the last few characters are held back:
they might turn out to be the start of a stop string that must not be shown.
Token state and the other ways to stop (stop ids, length) belong to the scheduler
(Scheduler.update_from_output); a stop string, being text, is decided here and
takes precedence over them, as in vLLM: the text ends where the string does.
"""
from __future__ import annotations

from colocate.engine.outputs import RequestOutput
from colocate.engine.request import FinishReason, Request


class RequestTextState:
    def __init__(self, request: Request, tokenizer) -> None:
        params = request.sampling_params
        self.detokenizer = None
        if tokenizer is not None:
            from colocate.engine.detokenizer import IncrementalDetokenizer

            self.detokenizer = IncrementalDetokenizer(
                tokenizer, request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        self.emitted_len = 0
        self.emitted_tokens = 0
        self.hold_back = max((len(s) for s in params.stop_strings), default=1) - 1


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestTextState] = {}

    def add(self, request: Request) -> None:
        self.states[request.request_id] = RequestTextState(request, self.tokenizer)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def on_token(self, request: Request) -> bool:
        """Add the text of the request's newest token (the scheduler appended it).
        True when a stop string ends a request that was still running, which the
        caller must then finish in the scheduler."""
        state = self.states[request.request_id]
        params = request.sampling_params
        was_finished = request.is_finished
        token_id = request.output_token_ids[-1]
        new_text = state.detokenizer.push(token_id) if state.detokenizer else ""
        if request.num_output_tokens >= params.min_tokens and params.stop_strings and new_text:
            self._check_stop_strings(request, state, new_text)
        else:
            # A stop token's text stays (vLLM's rule); EOS, being special, decodes to "".
            state.text += new_text
        return request.is_finished and not was_finished

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
