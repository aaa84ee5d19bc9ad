"""Triton kernels, one per file, each behind a launcher that checks its arguments.

Used on CUDA; on CPU they run only under TRITON_INTERPRET=1 (the kernel tests).
Importing this package imports triton, so the model imports it lazily, from the CUDA
attention path only.
"""
from colocate.kernels.merge_attention_partitions import merge_attention_partitions
from colocate.kernels.paged_decode_attention import paged_decode_attention
from colocate.kernels.paged_prefill_attention import paged_prefill_attention
from colocate.kernels.reshape_and_cache import reshape_and_cache

__all__ = ["merge_attention_partitions", "paged_decode_attention", "paged_prefill_attention",
           "reshape_and_cache"]
