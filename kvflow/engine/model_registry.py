"""The models an engine serves besides its base, by name: LoRA adapters and the block zoo's variants,
what the OpenAI `model` field and `LoRARequest` resolve to.

Variants (`--variant NAME=DIR`) are fixed at start; each is named by the digest of its files
(block_zoo.variant_digest), the same key the runner's zoo gives its blocks.

An adapter is validated against the base model once, when it is registered (at start from
`--lora-modules`, at run time through the offline API or the server's load endpoint): a wrong base,
rank or target module is refused then, with the reason, and never reaches the engine core. A
registered name resolves to an `AdapterRef` (name, directory, digest of its files) that travels with
each request; the core's runner reads the adapter from disk when it first needs it, and refuses the
request if the files no longer have that digest.
"""

from __future__ import annotations

import threading

from kvflow.config import EngineConfig
from kvflow.lora_request import AdapterRef, LoRARequest
from kvflow.model.block_zoo import variant_digest
from kvflow.model.lora import read_adapter


class UnknownAdapterError(LookupError):
    """A request names an adapter that is not registered (the server answers 404)."""


class ModelRegistry:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.enabled = config.lora.enable_lora
        self._refs: dict[str, AdapterRef] = {}
        self._parents: dict[str, str] = {}
        self._lock = threading.Lock()  # the server's load/unload endpoints run beside request intake
        self._variants = {name: AdapterRef(name, str(path), variant_digest(path), "variant")
                          for name, path in config.zoo.variants.items()}
        for name, path in config.lora.modules.items():
            self.add(name, path)

    def add(self, name: str, path: str) -> AdapterRef:
        """Validate the adapter at `path` against the base model and serve it as `name`."""
        if not self.enabled:
            raise ValueError("LoRA adapters need an engine started with enable_lora (--enable-lora)")
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            raise ValueError(f"an adapter name is a non-empty string without spaces, got {name!r}")
        if name in self._variants:
            raise ValueError(f"{name!r} names a model variant (--variant); choose another adapter name")
        with self._lock:
            if name in self._refs:
                raise ValueError(f"an adapter named {name!r} is already loaded (from {self._refs[name].path}); "
                                 "unload it first")
        adapter = read_adapter(path, self.config.model, self.config.lora.max_lora_rank, name)
        ref = AdapterRef(name, str(path), adapter.digest)
        with self._lock:
            if name in self._refs:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            self._refs[name] = ref
        return ref

    def remove(self, name: str) -> AdapterRef:
        """Stop serving `name`; requests already running with it finish with it."""
        with self._lock:
            ref = self._refs.pop(name, None)
        if ref is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        return ref

    def get(self, name: str) -> AdapterRef | None:
        """The adapter or variant called `name`, if any."""
        return self._refs.get(name) or self._variants.get(name)

    def refs(self) -> list[AdapterRef]:
        """Every variant, then every adapter (what /v1/models lists besides the base)."""
        return [*self._variants.values(), *self._refs.values()]

    def variant(self, name: str | None) -> AdapterRef | None:
        """A request's block-zoo variant by name (None: the base)."""
        if name is None:
            return None
        ref = self._variants.get(name)
        if ref is None:
            raise UnknownAdapterError(f"no model variant named {name!r}; variants: "
                                      f"{', '.join(sorted(self._variants)) or 'none (start with --variant NAME=DIR)'}")
        return ref

    def resolve(self, lora: LoRARequest | str | None) -> AdapterRef | None:
        """A request's adapter: None (the base), a registered name, or a `LoRARequest` (registered on first
        use when it gives a path)."""
        if lora is None:
            return None
        if not self.enabled:
            raise ValueError("this engine serves no LoRA adapters: start it with enable_lora (--enable-lora)")
        if isinstance(lora, str):
            ref = self._refs.get(lora)
            if ref is None:
                raise UnknownAdapterError(f"no adapter named {lora!r} is loaded; loaded: "
                                          f"{', '.join(sorted(self._refs)) or 'none'}")
            return ref
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest or an adapter name, got {type(lora).__name__}")
        ref = self._refs.get(lora.lora_name)
        if ref is not None:
            if lora.lora_path is not None and lora.lora_path != ref.path:
                raise ValueError(f"adapter {lora.lora_name!r} is loaded from {ref.path}, not {lora.lora_path}")
            return ref
        if lora.lora_path is None:
            raise UnknownAdapterError(f"no adapter named {lora.lora_name!r} is loaded (give lora_path to load it)")
        try:
            return self.add(lora.lora_name, lora.lora_path)
        except ValueError:
            existing = self._refs.get(lora.lora_name)  # another thread registered it meanwhile
            if existing is not None and existing.path == lora.lora_path:
                return existing
            raise
