"""The tiny model with attention on the Triton kernels (interpreted) matches the
torch ops path, step by step, for both cache dtypes."""
from __future__ import annotations

import pytest
import torch

from colocate.model.attention import ATTENTION_BACKEND_ENV
from colocate.model.loader import load_model
from tests.model_steps import run_schedule


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8], ids=["fp32-kv", "int8-kv"])
def test_kernel_path_matches_torch_path(tiny_model_dir, kv_dtype, monkeypatch):
    model = load_model(tiny_model_dir)
    want = run_schedule(model, kv_dtype)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    got = run_schedule(model, kv_dtype)
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"step {step}")
