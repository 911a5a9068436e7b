"""KV offload tiers behind the prefix cache: a host-memory tier and a file tier on local SSD, as a KV
connector (`connector.py`). Full cached blocks are written through to the tiers on I/O threads; a
prefix that misses the working pool but hits a tier is loaded instead of recomputed when the
performance model (`cost_model.py`) says loading is faster. See docs/kv_offload.md."""
