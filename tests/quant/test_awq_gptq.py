"""AWQ and GPTQ import: known answers from packers written here, from the formats' own
descriptions (independent of colocate/quant/awq.py and gptq.py), and whole checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from colocate.quant.loading import load_model
from colocate.model.model_config import LlamaConfig
from colocate.quant import awq, gptq
from colocate.quant.config import QuantConfig
from colocate.quant.prequantized import read_prequantized

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]     # nibble i holds column AWQ_PACK_ORDER[i]


def _to_int32(v):
    """An unsigned 32-bit word (int or int64 tensor) reinterpreted as signed int32."""
    return v - (1 << 32) if isinstance(v, int) and v >= 1 << 31 else (
        v if isinstance(v, int) else torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32))


_SHIFT = 4 * torch.arange(8, dtype=torch.int64)                             # nibble i at bits 4i


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(R, C) ints in [0, 15] -> (R, C/8) int32, 8 columns per word in AWQ's order."""
    R, C = values.shape
    by_nibble = values.long().view(R, C // 8, 8)[:, :, AWQ_PACK_ORDER]   # [.., i]: col order[i]
    return _to_int32((by_nibble << _SHIFT).sum(-1))


def pack_gptq_rows(values: torch.Tensor) -> torch.Tensor:
    """(R, C) -> (R/8, C) int32: row 8r + i in nibble i of row r."""
    R, C = values.shape
    by_nibble = values.long().view(R // 8, 8, C)                            # [r, i] = row 8r + i
    return _to_int32((by_nibble << _SHIFT[None, :, None]).sum(1))


def pack_gptq_columns(values: torch.Tensor) -> torch.Tensor:
    """(R, C) -> (R, C/8) int32: column 8c + j in nibble j of column c."""
    return pack_gptq_rows(values.t().contiguous()).t().contiguous()


def test_single_words_by_hand():
    cols = torch.arange(1, 9)[None, :]                                      # values 1..8
    assert pack_awq(cols).item() == _to_int32(0x86427531)                   # 1,3,5,7,2,4,6,8
    assert pack_gptq_rows(cols.t()).item() == _to_int32(0x87654321)
    one_to_eight = list(range(1, 9))
    awq_word = torch.tensor([[_to_int32(0x86427531)]])
    gptq_word = torch.tensor([[_to_int32(0x87654321)]])
    assert awq.unpack_columns(awq_word).flatten().tolist() == one_to_eight
    assert gptq.unpack_rows(gptq_word).flatten().tolist() == one_to_eight
    assert gptq.unpack_columns(gptq_word).flatten().tolist() == one_to_eight


def _random_int4(k: int, n: int, groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)                           # (K, N) as stored
    zero = torch.randint(1, 16, (groups, n), generator=g)   # >= 1: GPTQ v1 stores zero - 1
    scale = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).half()
    return q, zero, scale


def test_awq_known_answer():
    K, N, G = 64, 16, 2
    q, zero, scale = _random_int4(K, N, G, 0)
    w = awq.to_int4(pack_awq(q), pack_awq(zero), scale, group_size=32)
    assert torch.equal(w.q, q.t().to(torch.uint8))
    assert torch.equal(w.zero, zero.t().float())
    expected = (q - zero.repeat_interleave(32, 0)).float() * scale.float().repeat_interleave(32, 0)
    assert torch.equal(w.dequantize(), expected.t())                         # (N, K)


@pytest.mark.parametrize("fmt,offset", [("gptq", 1), ("gptq_v2", 0)])   # v1 stores zero - 1
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_known_answer(fmt, offset, act_order):
    K, N, group = 64, 16, 32
    q, zero, scale = _random_int4(K, N, K // group, 1)
    if act_order:   # channel k belongs to group g_idx[k]; GPTQ quantized them in order `order`
        order = torch.randperm(K, generator=torch.Generator().manual_seed(2))
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[order] = (torch.arange(K) // group).int()
    else:
        g_idx = (torch.arange(K) // group).int()
    w = gptq.to_int4(pack_gptq_rows(q), pack_gptq_columns(zero - offset), scale, g_idx,
                     group, gptq.FORMATS[fmt])
    assert (w.perm is not None) == act_order
    expected = (q - zero[g_idx.long()]).float() * scale.float()[g_idx.long()]   # (K, N)
    assert torch.equal(w.dequantize(), expected.t())


# ---- whole checkpoints ---------------------------------------------------------------

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _write_quantized_checkpoint(src, dst, method: str, group: int = 32, desc_act: bool = False):
    """Quantize the tiny float checkpoint's linears to random-but-plausible int4 and
    write them in `method`'s format. Returns {linear: float reference (N, K)}."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    refs, gen = {}, torch.Generator().manual_seed(3)
    perms: dict[int, torch.Tensor] = {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        N, K = tensors.pop(name).shape
        prefix = name.removesuffix(".weight")
        q, zero, scale = _random_int4(K, N, K // group, len(refs))
        g_idx = (torch.arange(K) // group).int()
        if desc_act:    # one order per input width: fused projections share their input
            order = perms.setdefault(K, torch.randperm(K, generator=gen))
            g_idx = torch.empty(K, dtype=torch.int32)
            g_idx[order] = (torch.arange(K) // group).int()
        refs[prefix] = ((q - zero[g_idx.long()]).float() * scale.float()[g_idx.long()]).t()
        tensors[f"{prefix}.scales"] = scale
        if method == "awq":
            tensors[f"{prefix}.qweight"] = pack_awq(q)
            tensors[f"{prefix}.qzeros"] = pack_awq(zero)
        else:
            tensors[f"{prefix}.qweight"] = pack_gptq_rows(q)
            tensors[f"{prefix}.qzeros"] = pack_gptq_columns(zero - 1)
            tensors[f"{prefix}.g_idx"] = g_idx
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
         "version": "gemm"} if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
         "sym": False})
    (dst / "config.json").write_text(json.dumps(cfg))
    return refs


@pytest.mark.parametrize("method,desc_act", [("awq", False), ("gptq", False), ("gptq", True)])
def test_checkpoint_converts_to_the_internal_layout(tiny_model_dir, tmp_path, method, desc_act):
    path = tmp_path / method
    refs = _write_quantized_checkpoint(tiny_model_dir, path, method, desc_act=desc_act)
    config = LlamaConfig.from_pretrained(path)
    # Exact check through the CUDA layout (float zeros), unpacked on the host.
    qc = QuantConfig("int4", group_size=32, source=method, layout="kn", act_order=desc_act)
    state = read_prequantized(path, config, torch.float32, qc)
    from colocate.quant.loading import build_model
    model = build_model(config, qc, torch.float32)
    model.load_state_dict(state, assign=True)
    qkv = model.model.layers[1].self_attn.qkv_proj.dequantize()
    expected = torch.cat([refs[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    assert torch.equal(model.model.layers[2].mlp.down_proj.dequantize(),
                       refs["model.layers.2.mlp.down_proj"])
    # load_model on CPU: the tinygemm layout, within its bf16 rounding of scales.
    cpu = load_model(path)
    got = cpu.model.layers[1].self_attn.qkv_proj.dequantize()
    step = (expected - got).abs().max() / expected.abs().max()
    assert step < 1e-2


def test_bad_checkpoint_settings(tiny_model_dir, tmp_path):
    path = tmp_path / "awq"
    _write_quantized_checkpoint(tiny_model_dir, path, "awq")
    cfg = json.loads((path / "config.json").read_text())
    for edit, match in [({"bits": 8}, "bits=8"), ({"quant_method": "bitsandbytes"}, "quant_method"),
                        ({"version": "gemv"}, "version")]:
        (path / "config.json").write_text(
            json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **edit}}))
        with pytest.raises(ValueError, match=match):
            load_model(path)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization='int8'"):
        load_model(path, quantization="int8")
