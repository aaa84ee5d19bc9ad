"""The prompt forms LLM.generate accepts, as vLLM's does, turned into text or token ids.

    "text"                          one text prompt
    [1, 15043, ...]                 one prompt of token ids
    {"prompt": "text"}              one text prompt (vLLM's TextPrompt)
    {"prompt_token_ids": [ids]}     one prompt of token ids (vLLM's TokensPrompt)
    a list of any of the above      a batch

Anything else is a TypeError that names the type, before any request is added.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Prompt = str | list[int]


def _is_ids(x: Any) -> bool:
    return (isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in x))


def one_prompt(p: Any, where: str = "prompt") -> Prompt:
    """One prompt in any accepted form -> text or a list of token ids. Emptiness and
    ids outside the vocabulary are the engine's to refuse (a ValueError)."""
    if isinstance(p, str):
        return p
    if _is_ids(p) or (isinstance(p, (list, tuple)) and not p):
        return list(p)
    if isinstance(p, Mapping):
        if "prompt_token_ids" in p:
            ids = p["prompt_token_ids"]
            if not _is_ids(ids):
                raise TypeError(f"{where}['prompt_token_ids'] must be a non-empty list of "
                                f"ints, got {type(ids).__name__}")
            return list(ids)
        if "prompt" in p:
            if not isinstance(p["prompt"], str):
                raise TypeError(f"{where}['prompt'] must be a str, got "
                                f"{type(p['prompt']).__name__}")
            return p["prompt"]
        raise TypeError(f"{where} is a dict without 'prompt' or 'prompt_token_ids' "
                        f"(keys: {sorted(map(str, p))})")
    raise TypeError(f"{where} must be a str, a list of token ids, {{'prompt': str}} or "
                    f"{{'prompt_token_ids': [int, ...]}}, got {type(p).__name__}")


def normalize_prompts(prompts: Any) -> list[Prompt]:
    """A single prompt or a list of prompts -> a list of text / token-id prompts."""
    if isinstance(prompts, (str, Mapping)) or _is_ids(prompts):
        return [one_prompt(prompts)]
    if isinstance(prompts, Sequence) and not isinstance(prompts, bytes):
        if not prompts:
            raise ValueError("prompts must not be empty")
        return [one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    raise TypeError(f"prompts must be a str, a list of token ids, a prompt dict or a list of "
                    f"those, got {type(prompts).__name__}")
