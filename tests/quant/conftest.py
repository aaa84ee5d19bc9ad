"""Each CPU matmul backend a quantized model can run on (quant/cpu_ops.py)."""
from __future__ import annotations

import pytest

from colocate.quant.cpu_ops import BACKEND_ENV

# "blocks": the block-dot kernels, int8 activations per block of 32 (the default where
# they build); "torch": torch's weight-only ops on bf16 activations.
CPU_MATMULS = ("blocks", "torch")


@pytest.fixture(params=CPU_MATMULS)
def cpu_matmul(request, monkeypatch) -> str:
    """Run the test once per backend; models load (and pick their int4 layout) under it."""
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param
