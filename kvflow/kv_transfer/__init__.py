"""KV connectors: moving KV blocks in and out of an engine's paged cache.

`base.py` is the protocol the engine sees (a scheduler side and a worker side); the prefill/decode
transfer of disaggregated serving is one implementation (`pd_connector.py` over `sender.py`,
`receiver.py` and the wire format in `wire.py`).
"""
