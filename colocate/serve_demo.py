"""`colocate serve --demo`: one short request to every service once it is ready, its
answer printed. A chat model is asked a chat question through its chat template."""
from __future__ import annotations

from typing import TextIO

from colocate.config import DeploymentConfig, ModelSpec

# `colocate serve --demo` asks each service one of these (in turn) through its chat template.
DEMO_QUESTIONS = ("What is the capital of France?", "Name three primary colors.",
                  "How many legs does a spider have?")


def send_demo_requests(cfg: DeploymentConfig, endpoints: list,
                       out: TextIO, max_tokens: int = 48) -> None:
    """One short request to every service, with its first tenant's token: a chat
    question rendered by the model's chat template, or "Hello" for a model without one
    (the random tiny presets)."""
    from colocate.client import Client

    token_of = {s.name: s.tenants[0].token for _, s in cfg.services()}
    model_of = {s.name: cfg.models[s.model] for _, s in cfg.services()}
    for i, e in enumerate(endpoints):
        question = DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]
        prompt, shown, stops = demo_prompt(model_of[e.service], question)
        with Client(e.target, token_of[e.service], timeout=120) as client:
            text = client.generate_text(prompt, max_tokens=max_tokens, temperature=0.0,
                                        stop_token_ids=stops)
        print(f"  {e.service}: {shown!r} -> {text.strip()!r}", file=out, flush=True)
    print(file=out)


def demo_prompt(model: ModelSpec, question: str) -> tuple[str | list[int], str, list[int]]:
    """(prompt, what to print as the question, stop token ids) for a demo request."""
    from colocate.model.tokenizer import load_tokenizer
    from colocate.cluster.launch import checkpoint_dir

    tokenizer = load_tokenizer(checkpoint_dir(model))
    if tokenizer is None or tokenizer.chat_template is None:
        return "Hello", "Hello", []
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return ids, question, list(tokenizer.end_of_turn_ids())
