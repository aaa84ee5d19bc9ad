"""IncrementalDetokenizer: output token ids to text deltas, one push per token.

Text is the output processor's job, so this lives with it in the engine; it needs
of the tokenizer only `decode(ids, skip_special_tokens)`, so the engine imports no
model code.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, one push per token.

    A token may carry only part of a character (byte-level BPE splits UTF-8), and some
    decoders change a token's text depending on what precedes it (leading spaces).
    So each push decodes a short window: the tokens from `prefix_offset` on, compared
    with the text of the tokens already emitted from that window (`prefix_offset` to
    `read_offset`). The difference is new text, unless it ends in a replacement
    character, in which case it is held back until a later token completes it.
    """

    def __init__(self, tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_ids)
        self.output_ids: list[int] = []
        # Keep a few prompt tokens as left context so the first output token decodes as it
        # would mid-text (e.g. keeps its leading space under SentencePiece decoders).
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one output token; return the text it completes ("" if still incomplete)."""
        self.tokens.append(token_id)
        self.output_ids.append(token_id)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.tokens[self.prefix_offset:self.read_offset], skip)
        new_text = decode(self.tokens[self.prefix_offset:], skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta
