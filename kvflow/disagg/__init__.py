"""Phase-disaggregated serving: prefill and decode instances, KV connectors, the router.

One request: the router (`router.py`) sends it to a prefill instance and a decode instance at
once. The prefill instance computes the prompt and the first token and keeps the KV blocks
(`sender.py` serves them); the decode instance admits the request when it has blocks for it, pulls
the KV into them (`receiver.py`), and streams the tokens back through the router. `wire.py` is
the byte format both sides speak; `connector.py` is the engine's view of all of it.
"""
