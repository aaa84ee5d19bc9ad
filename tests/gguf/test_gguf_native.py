"""GGUF weights kept as stored: Q4_1 linears are int4 group 32 and Q8_0 int8 group 32,
whose dequantized weights equal the `gguf` package's own dequantization bit for bit;
`quantization` "none", "int8", "int4" dequantize or requantize instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from colocate import LLM, SamplingParams
from colocate.model.gguf_file import GGUFFile
from colocate.quant.loading import load_model
from colocate.quant import gguf as G
from colocate.quant.linear import Int4Linear, Int8Linear


def gguf_dequantized(reader: GGUFReader, name: str) -> torch.Tensor:
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))


@pytest.fixture(scope="module")
def native(smollm2_gguf):
    return load_model(smollm2_gguf)              # quantization None: as stored


def test_as_stored_is_int4_g32_and_bit_exact(smollm2_gguf, native):
    reader = GGUFReader(str(smollm2_gguf))
    config = native.config
    for layer in (0, 17, 29):
        blk, m = f"blk.{layer}.", native.model.layers[layer]
        qkv = m.self_attn.qkv_proj
        assert isinstance(qkv, Int4Linear) and qkv.group_size == 32
        ref = torch.cat([
            G.unpermute_rows(gguf_dequantized(reader, blk + "attn_q.weight"),
                             config.num_attention_heads),
            G.unpermute_rows(gguf_dequantized(reader, blk + "attn_k.weight"),
                             config.num_key_value_heads),
            gguf_dequantized(reader, blk + "attn_v.weight")])
        assert torch.equal(qkv.dequantize(), ref)
        gate_up = torch.cat([gguf_dequantized(reader, blk + "ffn_gate.weight"),
                             gguf_dequantized(reader, blk + "ffn_up.weight")])
        assert torch.equal(m.mlp.gate_up_proj.dequantize(), gate_up)
        assert torch.equal(m.mlp.down_proj.dequantize(), gguf_dequantized(reader, blk + "ffn_down.weight"))
        assert torch.equal(m.self_attn.o_proj.dequantize(),
                           gguf_dequantized(reader, blk + "attn_output.weight"))
    # The Q8_0 embedding (also the tied lm_head) is dequantized exactly.
    assert torch.equal(native.model.embed_tokens.weight, gguf_dequantized(reader, "token_embd.weight"))


def test_native_q4_0_and_q8_0_blocks_decode_exactly(tmp_path):
    """Q4_0 and Q8_0 have no tensor in the SmolLM2 file: quantize random rows with the
    gguf package and check our decoding against its dequantization."""
    from colocate.model.gguf_file import TensorInfo

    w = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        qt = GGMLQuantizationType[kind]
        raw = quantize(w, qt)
        ref = torch.from_numpy(np.array(dequantize(raw, qt)))
        info = TensorInfo("t", kind, (48, 64), raw)
        ours = G.int8_weight(info) if kind == "Q8_0" else G.int4_weight(info)
        assert torch.equal(ours.dequantize(), ref), kind
        if kind == "Q8_0":
            lin = Int8Linear(64, 48, group_size=32)
            lin.load_state_dict(Int8Linear.buffers_for(ours, torch.float32), assign=True)
        else:
            lin = Int4Linear(64, 48, group_size=32, exact_scales=True)
            lin.load_state_dict(Int4Linear.buffers_for(ours, torch.float32, "tinygemm", False,
                                                       exact_scales=True), assign=True)
        assert torch.equal(lin.dequantize(), ref), kind
        # The matmul runs on bf16 activations (and, for int4, bf16-rounded scales).
        x = torch.randn(3, 64)
        expect = x @ ref.t()                                                 # (3, 48)
        assert (lin(x) - expect).norm() / expect.norm() < 1e-2, kind


def test_quantization_modes(smollm2_gguf, native):
    none = load_model(smollm2_gguf, quantization="none")
    assert type(none.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(none.model.layers[0].mlp.down_proj.weight,
                       native.model.layers[0].mlp.down_proj.dequantize())
    int8 = load_model(smollm2_gguf, quantization="int8")
    assert isinstance(int8.model.layers[0].mlp.down_proj, Int8Linear)
    assert int8.model.layers[0].mlp.down_proj.group_size is None     # requantized per channel
    g64 = load_model(smollm2_gguf, quantization="int4", quant_group_size=64)
    assert g64.model.layers[0].mlp.down_proj.group_size == 64
    with pytest.raises(ValueError, match="quant_group_size=64 conflicts"):
        load_model(smollm2_gguf, quant_group_size=64)


def test_as_stored_answers(smollm2_gguf):
    llm = LLM(str(smollm2_gguf))
    # Not France: as stored, "The" and "L" start that answer 0.08 apart in logits even
    # computed exactly, and with int8 activations colocate, like llama.cpp on this file,
    # answers "L'Étoile, la Marseillaise, ..." (docs/benchmarks.md).
    out = llm.chat([{"role": "user", "content": "What is the capital of Japan?"}],
                   SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert "Tokyo" in out.text


def test_header_only_config(smollm2_gguf):
    f = GGUFFile(smollm2_gguf)
    assert f.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"
    assert f.tensors["blk.0.ffn_gate.weight"].shape == (1536, 576)


def test_the_tied_q8_0_embedding_is_kept_as_the_output_head(smollm2_gguf, native):
    """As stored on CPU, the logits come from the embedding's Q8_0 blocks as stored
    (llama.cpp's own head): codes and scales equal `gguf`'s reading of the file, the
    head dequantizes to exactly the float embedding, and the plan counts its bytes."""
    from colocate.config import ModelSpec
    from colocate.memory.sizing import ModelFootprint
    from colocate.quant import weight_bytes

    head = native.lm_head
    assert isinstance(head, Int8Linear) and head.group_size == 32
    raw = next(t for t in GGUFReader(str(smollm2_gguf)).tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(np.array(dequantize(raw.data, GGMLQuantizationType.Q8_0)))
    assert torch.equal(head.dequantize(), ref.reshape(head.out_features, head.in_features))
    assert torch.equal(head.dequantize(), native.model.embed_tokens.weight)
    plan = ModelFootprint.of(ModelSpec(name="m", path=str(smollm2_gguf)))
    assert plan.q8_head_bytes() == sum(b.nbytes for b in head.buffers())
    assert plan.weight_bytes() == weight_bytes(native)


def test_weight_store_shares_the_stored_blocks(smollm2_gguf, native, tmp_path):
    """Published once as stored (int4 g32, float32 scales) and attached zero-copy: the
    attached model's weights are the native load's, bit for bit."""
    from colocate.memory.weight_store import WeightStore, attach, detach

    with WeightStore("cpu", root=tmp_path) as store:
        handle = store.publish("smollm2", smollm2_gguf)
        assert handle.quantization["source"] == "gguf" and handle.quantization["group_size"] == 32
        model = attach(handle)
        try:
            for name in ("self_attn.qkv_proj", "mlp.down_proj"):
                ours = model.model.layers[3].get_submodule(name).dequantize()
                assert torch.equal(ours, native.model.layers[3].get_submodule(name).dequantize())
            assert handle.nbytes >= 193_012_992        # what `colocate plan` reserves
        finally:
            del model
            detach(handle)
