"""A service with int8 weights and an int8 KV cache, through the supervisor, Ray
and gRPC, answers exactly as the offline LLM with the same settings, and says
so in GetModelInfo."""
from __future__ import annotations

import torch

from colocate.client import Client
from colocate.sampling_params import SamplingParams
from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import cpu_deployment, stream_tokens, token_of


def test_int8_weights_and_kv_match_offline_llm(ray_session, tiny_model_dir, tmp_path):
    from colocate import LLM

    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["q8"], kv_tokens=256,
                            quantization="int8", kv_dtype="int8")
    prompt, sampling = "The quick brown fox", dict(max_tokens=12, temperature=0.0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=str(tiny_model_dir), quantization="int8", kv_cache_dtype="int8",
                  kv_cache_tokens=256, max_model_len=256, max_num_batched_tokens=128)
        expected = llm.generate([prompt], SamplingParams(**sampling))[0].token_ids
    finally:
        torch.set_num_threads(threads_before)

    with Deployment(config, torch_threads=1) as dep:
        dep.wait_ready(timeout=180)
        (endpoint,) = dep.endpoints()
        assert stream_tokens(endpoint.target, token_of("q8"), prompt, **sampling) == expected
        with Client(endpoint.target, token_of("q8")) as client:
            info = client.model_info()
        assert info.quantization == "int8" and info.kv_cache_dtype == "int8"
        assert info.kv_cache_tokens == 256 and info.weights_shared
        # int8 linears (embeddings stay float32): about half the float32 checkpoint.
        float_bytes = llm.config.num_parameters() * 4
        assert 0.3 * float_bytes < info.weight_bytes < 0.6 * float_bytes
