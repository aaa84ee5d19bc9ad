"""Train a small LLaMA on Python's standard library source, saved in HF layout.

Random weights say nothing about quantization error: their logits have no
structure to lose. This script gives the quality benchmark a model that has
learned something, from text every machine has (the stdlib's .py files), in a
few minutes on a CPU.

    python bench/train_tiny.py --out models/trained-tiny [--minutes 10]

The held-out split (every tenth file in sorted order) is never trained on;
bench/quality.py measures perplexity there. The training model below is a plain
dense LLaMA written for autograd with HF parameter names, so the result loads in
colocate and in transformers alike; it is not the serving model (which is paged
and inference-only).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from colocate.model.tiny import PRESETS, build_tokenizer, write_checkpoint

TRAINED_SHAPE = {
    "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 1024, "tie_word_embeddings": True,
}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return files


def split_corpus() -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): every tenth stdlib file is held out."""
    train, held = [], []
    for i, path in enumerate(stdlib_files()):
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if i % 10 == 0 else train).append(text)
    return train, held


class Block(nn.Module):
    def __init__(self, h: int, heads: int, inter: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.RMSNorm(h, eps=1e-5)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=1e-5)
        self.self_attn = nn.ModuleDict({n: nn.Linear(h, h, bias=False)
                                        for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(h, inter, bias=False),
                                  "up_proj": nn.Linear(h, inter, bias=False),
                                  "down_proj": nn.Linear(inter, h, bias=False)})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q, k, v = (a[n](y).view(B, T, self.heads, -1).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))                 # (B, nh, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, nh, T, hd)
        x = x + a["o_proj"](o.transpose(1, 2).reshape(B, T, H))
        y = self.post_attention_layernorm(x)
        m = self.mlp
        return x + m["down_proj"](F.silu(m["gate_proj"](y)) * m["up_proj"](y))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE, the convention checkpoints are stored in."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class TrainingLlama(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], h)
        self.layers = nn.ModuleList(Block(h, heads, cfg["intermediate_size"])
                                    for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.RMSNorm(h, eps=1e-5)
        hd = h // heads
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(cfg["max_position_embeddings"]).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)                                # (P, hd)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed_tokens(ids)                                         # (B, T, H)
        for layer in self.layers:
            x = layer(x, self.cos[:T], self.sin[:T])
        return self.norm(x) @ self.embed_tokens.weight.T                   # (B, T, V), tied

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        # Module names already follow HF's below the top-level `model.` prefix.
        return {f"model.{name}": t.detach().contiguous().clone()
                for name, t in self.state_dict().items()}


def batches(tokens: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
        chunk = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="models/trained-tiny")
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    cfg = {**PRESETS["tiny"], **TRAINED_SHAPE}
    train_texts, _ = split_corpus()
    t0 = time.perf_counter()
    tok = build_tokenizer(cfg["vocab_size"], args.seed, corpus=train_texts)
    ids = [i for text in train_texts for i in tok.encode(text).ids + [2]]
    tokens = torch.tensor(ids, dtype=torch.long)
    print(f"tokenizer and corpus: {len(train_texts)} files, {len(tokens):,} tokens "
          f"in {time.perf_counter() - t0:.1f} s")

    model = TrainingLlama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    start, step, losses = time.perf_counter(), 0, []
    for x, y in batches(tokens, args.seq_len, args.batch, gen):
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        # Cosine decay over the time budget, after a short warm-up.
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            recent = sum(losses[-25:]) / 25
            print(f"step {step:5d}  {elapsed:6.0f} s  loss {recent:.3f}  ppl {math.exp(recent):.1f}",
                  flush=True)
    path = write_checkpoint(args.out, cfg, model.hf_state_dict(), tok)
    summary = {"params": n_params, "steps": step, "tokens_seen": step * args.batch * args.seq_len,
               "final_train_loss": sum(losses[-25:]) / max(1, len(losses[-25:])),
               "minutes": (time.perf_counter() - start) / 60}
    (path / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
