"""What a disaggregated deployment checks before it serves."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kvflow.config import EngineConfig
from kvflow.disagg.deployment import DeploymentSpec
from kvflow.disagg.router import DisaggEngine
from kvflow.server.metrics import ServerMetrics


def test_instances_storing_kv_differently_refuse_to_start(llama_dir):
    """A prefill and a decode instance whose KV formats differ cannot exchange KV: start() fails
    naming each instance's format, and every instance process is stopped."""
    config = EngineConfig.create(str(llama_dir), dtype="float32", num_blocks=32, max_model_len=128)
    engine = DisaggEngine(config, None, ServerMetrics("startup-test"), 8, DeploymentSpec.from_counts(1, 1))
    decode = engine.instances[1]
    decode.config = dataclasses.replace(decode.config,
                                        cache=dataclasses.replace(decode.config.cache, kv_cache_dtype="int8"))
    with pytest.raises(ValueError, match="--kv-cache-dtype") as info:
        asyncio.run(engine.start())
    assert "float32" in str(info.value) and "int8" in str(info.value)
    for instance in engine.instances:
        assert not instance.client.launcher.is_alive()  # the process was stopped
