"""Disaggregated instances as Ray actors, placed by a placement group, across machines.

`RayCluster` connects the front to a running Ray cluster (`ray start --head` on one node,
`ray start --address HEAD:6379` on the others) and reserves one bundle per instance in a
placement group, so a plan's node affinity (`InstanceSpec.node`, or a STRICT_* strategy) holds
before any model is loaded. `RayCoreLauncher` runs an engine core inside an `EngineCoreActor` on
its bundle. Control messages still travel over the core client's ZMQ sockets (bound on the
front's node IP, over TCP), and KV over the connector's TCP transport from the prefill actor's
node IP: Ray only places, starts and watches the processes. Actors are owned by the front, so
Ray kills them if the front dies.

Ray is optional (`pip install kvflow[ray]`); it is imported only when `--ray-address` is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
from collections.abc import Callable
from typing import Any

from kvflow.config import EngineConfig
from kvflow.disagg.deployment import DeploymentSpec, InstanceSpec
from kvflow.engine.core_launcher import CoreLauncher

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray-address needs Ray: pip install 'kvflow[ray]' (or pip install ray)") from None
    return ray


class EngineCoreActor:
    """One engine core in a Ray worker process; `run` returns when the core stops."""

    def run(self, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        import ray

        from kvflow.engine.core_process import run_engine_core

        if config.kv_transfer is not None:  # serve KV pulls on this node's address, reachable cluster-wide
            config = dataclasses.replace(config, kv_transfer=dataclasses.replace(
                config.kv_transfer, host=ray.util.get_node_ip_address()))
        run_engine_core(config, input_addr, output_addr, parent_pid=None)


class RayCluster:
    """The front's connection to Ray and the placement group holding every instance's bundle."""

    def __init__(self, address: str, deployment: DeploymentSpec, placement_timeout: float = 120.0,
                 namespace: str = "kvflow") -> None:
        if placement_timeout <= 0:
            raise ValueError(f"the placement timeout must be > 0 s, got {placement_timeout}")
        self.address = address
        self.deployment = deployment
        self.placement_timeout = placement_timeout
        self.namespace = namespace
        self.front_ip: str | None = None
        self._ray: Any = None
        self._group: Any = None

    async def connect(self) -> None:
        """Join the cluster, then reserve the bundles; raise with the shortfall if they never fit."""
        timeout = self.placement_timeout
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            # ray.init replaces the SIGTERM handler with an immediate exit; the server's graceful
            # shutdown (drain requests, stop the actors) needs its own back.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                ray.init(address=self.address, namespace=self.namespace, logging_level=logging.WARNING,
                         runtime_env={"env_vars": _forwarded_env()})
            finally:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        self.front_ip = ray.util.get_node_ip_address()
        bundles = [i.bundle() for i in self.deployment.instances]
        self._group = ray.util.placement_group(bundles, strategy=self.deployment.placement_strategy,
                                               name=f"kvflow-{os.getpid()}")
        try:
            await asyncio.wait_for(self._group.ready(), timeout)
        except TimeoutError:
            available = ray.available_resources()
            await self.close()
            raise RuntimeError(
                f"the Ray cluster at {self.address} cannot place this deployment within {timeout:.0f} s: it asks "
                f"for bundles {bundles} ({self.deployment.placement_strategy}); available now: {available}"
            ) from None
        logger.info("Ray placement group ready: %d bundles, %s", len(bundles), self.deployment.placement_strategy)

    def launcher(self, index: int) -> RayCoreLauncher:
        assert self._group is not None and self.front_ip is not None, "connect() first"
        return RayCoreLauncher(self._ray, self._group, index, self.deployment.instances[index], self.front_ip)

    async def close(self) -> None:
        """Give the bundles back and leave the cluster (actors must be stopped already)."""
        if self._ray is None:
            return
        if self._group is not None:
            try:
                self._ray.util.remove_placement_group(self._group)
            except Exception as exc:  # the cluster may be gone already
                logger.warning("could not remove the placement group: %s", exc)
            self._group = None
        self._ray.shutdown()


def _forwarded_env() -> dict[str, str]:
    """Settings an engine reads from the environment, passed on to actors on other machines."""
    return {k: v for k, v in os.environ.items() if k.startswith("KVFLOW_")}


class RayCoreLauncher(CoreLauncher):
    """Starts an engine core as an actor on bundle `index`; its pending `run` call is the liveness signal."""

    def __init__(self, ray: Any, group: Any, index: int, spec: InstanceSpec, front_ip: str) -> None:
        self._ray = ray
        self._group = group
        self._index = index
        self._spec = spec
        self._front_ip = front_ip
        self._actor: Any = None
        self._future: Any = None  # concurrent.futures.Future of the actor's `run` call

    @property
    def bind_host(self) -> str:
        return self._front_ip

    def start(self, config: EngineConfig, input_addr: str, output_addr: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self._group,
                                                    placement_group_bundle_index=self._index)
        actor_class = self._ray.remote(max_restarts=0, max_task_retries=0)(EngineCoreActor)
        self._actor = actor_class.options(num_cpus=self._spec.num_cpus, num_gpus=self._spec.num_gpus,
                                          scheduling_strategy=strategy).remote()
        config = dataclasses.replace(config, num_threads=config.num_threads or self._spec.threads)
        self._future = self._actor.run.remote(config, input_addr, output_addr).future()

    def is_alive(self) -> bool:
        return self._future is not None and not self._future.done()

    def watch(self, on_exit: Callable[[], None]) -> None:
        assert self._future is not None
        loop = asyncio.get_running_loop()
        self._future.add_done_callback(lambda _: loop.call_soon_threadsafe(on_exit))

    async def stop(self, timeout: float) -> bool:
        if self._future is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)
            clean = True
        except TimeoutError:
            clean = False
        except Exception:  # it died rather than stopping; it is gone either way
            clean = True
        self._ray.kill(self._actor, no_restart=True)  # free its worker process and bundle share
        return clean

    async def exit_reason(self) -> str:
        if self._future is None or not self._future.done():
            return "still running"
        error = self._future.exception()
        if error is None:
            return "the actor's core returned"
        return f"Ray: {_first_sentences(str(error))}"


def _first_sentences(text: str, limit: int = 300) -> str:
    """Ray's actor errors run to paragraphs of advice; keep the cause: the Python exception an
    actor raised, or the worker's exit detail."""
    raised = re.findall(r"^\s*(\w+(?:Error|Exception|Exit): .*)$", text, flags=re.MULTILINE)
    if raised:
        return raised[-1].strip()[:limit]
    flat = " ".join(text.split())
    detail = flat.find("Worker exit detail:")
    if detail >= 0:
        end = flat.find(" Some common causes", detail)
        flat = flat[:flat.find(".") + 1] + " " + flat[detail:end if end >= 0 else None]
    return flat[:limit]
