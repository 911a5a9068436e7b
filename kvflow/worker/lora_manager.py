"""Which adapter is in which slot: the runner's side of multi-LoRA serving.

Three places an adapter can be, as in vLLM and S-LoRA: on disk (its directory), in host memory (a
parsed `LoRAAdapter`, at most `max_cpu_loras`, least recently used dropped first), and in one of the
`max_loras` slots a step computes with. The scheduler never runs more distinct adapters in a step
than there are slots, so `prepare` can always place them: an adapter already resident keeps its slot,
others take a free slot or the least recently used one that this step does not need.

Every lookup is by the adapter's key (name and digest of its files, kvflow/lora_request.py): what is
read from disk must still have the digest the request was admitted with, else the request's adapter
changed under it and the step refuses it (`AdapterLoadError`) rather than run other weights.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from kvflow.config import EngineConfig
from kvflow.lora_request import AdapterRef
from kvflow.model.lora import LoRAAdapter, LoRASlots, read_adapter
from kvflow.worker.step import ScheduledChunk


class AdapterLoadError(RuntimeError):
    """Adapters of this step could not be loaded; `keys` names them (their requests must finish)."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__("; ".join(f"{key}: {why}" for key, why in keys.items()))
        self.keys = keys


@dataclass
class LoRAStats:
    disk_loads: int = 0  # adapters read from disk (first use, or after leaving host memory)
    slot_loads: int = 0  # adapters written into a slot
    host_evictions: int = 0


class LoRAManager:
    def __init__(self, config: EngineConfig, model: nn.Module) -> None:
        lora = config.lora
        self.model_config = config.model
        self.max_rank = lora.max_lora_rank
        self.host_capacity = lora.host_slots
        self.slots = LoRASlots(model, lora.max_loras, lora.max_lora_rank)
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.slot_keys: list[str | None] = [None] * lora.max_loras
        self._last_used = [0] * lora.max_loras
        self._clock = itertools.count(1)
        self.stats = LoRAStats()

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, int, int]]:
        """Place this step's adapters in slots and set the (slot, start, end) runs of its flat tokens (in
        `chunks`' order) on the modules (LoRASlots.set_runs); returns the runs (the C++ forward's)."""
        refs: dict[str, AdapterRef] = {}
        for chunk in chunks:
            ref = chunk.request.lora
            if ref is not None:
                refs.setdefault(ref.key, ref)
        if len(refs) > len(self.slot_keys):
            raise RuntimeError(f"a step with {len(refs)} adapters, more than max_loras={len(self.slot_keys)} "
                               "(the scheduler admits at most that many)")
        slot_of = self._place(refs)
        runs: list[tuple[int, int, int]] = []
        start = 0
        for chunk in chunks:
            ref = chunk.request.lora
            end = start + chunk.num_tokens
            if ref is not None:
                slot = slot_of[ref.key]
                if runs and runs[-1][0] == slot and runs[-1][2] == start:
                    runs[-1] = (slot, runs[-1][1], end)
                else:
                    runs.append((slot, start, end))
            start = end
        self.slots.set_runs(runs, start)
        return runs

    def _place(self, refs: dict[str, AdapterRef]) -> dict[str, int]:
        now = next(self._clock)
        slot_of = {key: i for i, key in enumerate(self.slot_keys) if key in refs}
        failed: dict[str, str] = {}
        for key, ref in refs.items():
            if key in slot_of:
                continue
            try:
                adapter = self._host_adapter(ref)
            except (ValueError, OSError) as e:
                failed[key] = str(e)
                continue
            busy = set(slot_of.values())
            free = [i for i in range(len(self.slot_keys)) if i not in busy]
            # An empty slot first, else the least recently used one this step does not need.
            slot = min(free, key=lambda i: (self.slot_keys[i] is not None, self._last_used[i]))
            self.slots.load(slot, adapter)
            self.slot_keys[slot] = key
            self.stats.slot_loads += 1
            slot_of[key] = slot
        if failed:
            raise AdapterLoadError(failed)
        for slot in slot_of.values():
            self._last_used[slot] = now
        return slot_of

    def _host_adapter(self, ref: AdapterRef) -> LoRAAdapter:
        adapter = self.host.get(ref.key)
        if adapter is not None:
            self.host.move_to_end(ref.key)
            return adapter
        adapter = read_adapter(ref.path, self.model_config, self.max_rank, ref.name)
        if adapter.digest != ref.digest:
            raise ValueError(f"adapter {ref.name!r} at {ref.path} changed on disk since it was registered "
                             f"(digest {adapter.digest}, registered {ref.digest}): load it again")
        self.stats.disk_loads += 1
        self.host[ref.key] = adapter
        while len(self.host) > self.host_capacity:
            self.host.popitem(last=False)
            self.stats.host_evictions += 1
        return adapter

    def resident(self) -> dict[str, int]:
        """Adapter key -> slot, for what the slots hold now."""
        return {key: i for i, key in enumerate(self.slot_keys) if key is not None}
