"""`kvflow serve --disagg --ray-address`: instances as Ray actors, on a local Ray cluster the test starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.disagg.server_helpers import (
    Servers,
    complete_all,
    instances,
    kill_decode_before_first_tokens,
    metric,
    wait_until,
)
from tests.server.server_utils import ServerProcess, free_port, kill_group

pytest.importorskip("ray")

CLUSTER_CPUS = 4


class RayHead:
    """`ray start --head --block` in its own session: SIGTERM drains and stops every Ray process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="kvr", dir="/tmp")  # short: Ray's socket paths must fit
        ray = shutil.which("ray")
        assert ray, "the ray CLI is not on PATH"
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(CLUSTER_CPUS), "--include-dashboard=false", "--disable-usage-stats",
             "--temp-dir", self.dir],
            stdout=open(Path(self.dir) / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def used_cpus(self) -> float | None:
        """CPUs held by actors and placement groups, from `ray status` (None until it answers)."""
        out = subprocess.run([shutil.which("ray") or "ray", "status", "--address", self.address],
                             capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"([\d.]+)/([\d.]+) CPU", out)
        return float(match.group(1)) if match else None

    def node_ip(self) -> str:
        match = re.search(r"Local node IP: (\S+)", (Path(self.dir) / "head.log").read_text())
        assert match, "no node IP in the head's log"
        return match.group(1)

    def wait_ready(self, timeout: float = 60.0) -> RayHead:
        deadline = time.monotonic() + timeout
        while self.used_cpus() is None:
            assert self.proc.poll() is None, (Path(self.dir) / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc.pid)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = RayHead()
    try:
        yield head.wait_ready()
    finally:
        head.stop()


@pytest.fixture
def ray_start(start: Servers, ray_head: RayHead) -> Iterator[Servers]:
    yield start
    start.stop_all()
    # Whatever happened to the servers, their actors and bundles must be gone from the cluster.
    assert wait_until(lambda: ray_head.used_cpus() == 0, timeout=30), ray_head.used_cpus()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ray_deployment_matches_colocated_and_gives_everything_back(ray_start, ray_head):
    colocated = ray_start()
    expected = complete_all(colocated.url)
    colocated.stop()
    srv = ray_start("--disagg", "--ray-address", ray_head.address, "--prefill", "1", "--decode", "2")
    # One bundle per instance, reserved by the placement group (`ray status` reports it with a lag).
    assert wait_until(lambda: ray_head.used_cpus() == 3, timeout=30), ray_head.used_cpus()
    assert complete_all(srv.url) == expected
    assert metric(srv.url, "kvflow:kv_transfers_total") == 4
    assert metric(srv.url, "kvflow:kv_load_fallbacks_total") == 0
    state = instances(srv.url)
    assert sorted(i["role"] for i in state.values()) == ["decode", "decode", "prefill"]
    # The prefill actor serves KV on its node's address, not on the loopback default.
    assert not state["prefill-0"]["kv_address"].startswith("0.0.0.0")
    pids = [i["pid"] for i in state.values()]
    assert all(alive(pid) for pid in pids) and srv.proc.pid not in pids
    assert srv.stop() == 0  # graceful: Ray's SIGTERM handler does not cut the shutdown short
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=20)


def test_ray_instance_deaths_are_retried_then_reported(ray_start, ray_head, tmp_path):
    # From a deployment file, as `kvflow plan` writes it: the prefill instance pinned to the head node.
    plan = tmp_path / "deployment.json"
    plan.write_text(json.dumps({"placement_strategy": "STRICT_PACK", "instances": [
        {"role": "prefill", "num_cpus": 1, "node": ray_head.node_ip()},
        {"role": "decode", "num_cpus": 1}, {"role": "decode", "num_cpus": 1}]}))
    srv = ray_start("--ray-address", ray_head.address, "--deployment", str(plan))
    expected = complete_all(srv.url)
    info = instances(srv.url)
    assert info["prefill-0"]["kv_address"].startswith(ray_head.node_ip() + ":")
    prefill = info["prefill-0"]["pid"]
    kill_decode_before_first_tokens(srv.url, expected)
    assert "Ray" in instances(srv.url)["decode-0"]["error"]
    # The prefill actor dies too: decode-1 computes the prompts itself.
    os.kill(prefill, signal.SIGKILL)
    assert wait_until(lambda: not instances(srv.url)["prefill-0"]["alive"])
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert complete_all(srv.url) == expected
    assert wait_until(lambda: metric(srv.url, "kvflow:kv_cache_usage_perc") == 0)
    # The front killed outright: Ray kills the actors it owned (the fixture checks their bundles are freed).
    survivor = instances(srv.url)["decode-1"]["pid"]
    os.kill(srv.proc.pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(survivor), timeout=30)


def test_unplaceable_deployment_fails_clearly(llama_dir, tmp_path, ray_head):
    plan = tmp_path / "deployment.json"
    plan.write_text(json.dumps({"instances": [{"role": "prefill", "node": "203.0.113.9"}, {"role": "decode"}]}))
    srv = ServerProcess(llama_dir, tmp_path / "serve.log", "--ray-address", ray_head.address,
                        "--deployment", str(plan), "--ray-placement-timeout", "3")
    try:
        assert srv.proc.wait(120) != 0
    finally:
        srv.stop()
    assert "cannot place this deployment" in srv.log() and "node:203.0.113.9" in srv.log()
    assert wait_until(lambda: ray_head.used_cpus() == 0, timeout=30)
