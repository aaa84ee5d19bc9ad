"""`colocate serve --demo`: one short request to every service once it is ready, its
answer printed. A chat model is asked a chat question through the Chat RPC, which
renders it with the model's chat template in the service."""
from __future__ import annotations

from typing import TextIO

from colocate.config import DeploymentConfig

# `colocate serve --demo` asks each service one of these (in turn) through its chat template.
DEMO_QUESTIONS = ("What is the capital of Japan?", "Name three primary colors.",
                  "How many days are in a week?")


def send_demo_requests(cfg: DeploymentConfig, endpoints: list,
                       out: TextIO, max_tokens: int = 48) -> None:
    """One short request to every service, with its first tenant's token: a chat
    question, or "Hello" as a plain prompt for a model without a chat template (the
    random tiny presets, whose Chat answers FAILED_PRECONDITION)."""
    import grpc

    from colocate.client import Client

    token_of = {s.name: s.tenants[0].token for _, s in cfg.services()}
    for i, e in enumerate(endpoints):
        question = DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]
        with Client(e.target, token_of[e.service], timeout=120) as client:
            try:
                shown = question
                text = "".join(d.text for d in client.chat(
                    [{"role": "user", "content": question}], max_tokens=max_tokens,
                    temperature=0.0))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                shown = "Hello"
                text = client.generate_text("Hello", max_tokens=max_tokens, temperature=0.0)
        print(f"  {e.service}: {shown!r} -> {text.strip()!r}", file=out, flush=True)
    print(file=out)
