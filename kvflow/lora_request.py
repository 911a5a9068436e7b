"""Which LoRA adapter or model variant a request runs with: `LoRARequest` (what a user names) and
`AdapterRef` (what the engine runs: the files pinned by a digest of their bytes).

The digest is the adapter's identity everywhere below the API: the scheduler counts distinct adapters
by it, the prefix cache salts KV blocks with it, and the runner keys its resident slots and host copies
by it. An adapter replaced on disk, or unloaded and loaded again under the same name with other
weights, therefore never reuses KV or a slot computed with the old weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


@dataclass(frozen=True)
class LoRARequest:
    """A request's adapter in the offline API, as vLLM spells it: `LoRARequest("sql", 1, "/adapters/sql")`.

    `lora_int_id` is accepted for vLLM compatibility and not used (adapters are told apart by the digest
    of their files); `lora_path` may be omitted for an adapter the engine was started with."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str | None = None


class AdapterRef(msgspec.Struct, frozen=True):
    """A validated adapter: its name, its directory and the BLAKE2b digest of its weight and config files.
    `kind`: "lora" (a LoRA adapter) or "variant" (a full fine-tuned model of the block zoo)."""

    name: str
    path: str
    digest: str
    kind: str = "lora"

    @property
    def key(self) -> str:
        """The adapter's identity: two refs with the same key compute the same KV."""
        return f"{self.name}@{self.digest}"
