"""Phase-disaggregated serving above the engine: the router, the deployment, the Ray launcher.

One request: the router (`router.py`) sends it to a prefill instance and a decode instance at
once. The prefill instance computes the prompt and the first token and keeps the KV blocks; the
decode instance admits the request when it has blocks for it, pulls the KV into them, and streams
the tokens back through the router. Moving the KV is the engine's business, through its KV
connector (kvflow/kv_transfer/); this package only places instances and routes requests.
"""
