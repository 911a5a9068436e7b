"""Triton attention kernels (paged KV cache) and the backend built on them.

On a machine without a GPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1
before importing this package (triton.jit reads it at decoration time).
"""

try:
    import triton  # noqa: F401  (every module here compiles kernels with it)
except ImportError as exc:  # an optional extra: say which
    raise ImportError("kvflow's Triton attention kernels need Triton: pip install 'kvflow[gpu]'") from exc

from kvflow.attention.triton.backend import TritonBackend  # noqa: E402
from kvflow.attention.triton.decode import decode_attention, default_num_splits
from kvflow.attention.triton.kv_store import store_kv
from kvflow.attention.triton.prefill import prefill_attention

__all__ = ["TritonBackend", "decode_attention", "default_num_splits", "prefill_attention", "store_kv"]
