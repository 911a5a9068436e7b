"""The default KV budget under a memory cgroup (a container, a pod): from what the cgroup still allows,
not from the host's /proc/meminfo."""

from __future__ import annotations

from pathlib import Path

from kvflow.worker import kv_budget
from kvflow.worker.kv_budget import cgroup_memory_room, default_kv_cache_bytes

GIB = 2**30


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_v2_takes_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "sys"
    write(root / "kubepods/pod1/ctr", memory__max=str(2 * GIB), memory__current=str(GIB),
          memory__stat=f"anon 1\ninactive_file {100 * 2**20}\nactive_file 5\n")
    assert cgroup_memory_room(str(proc), str(root)) == GIB + 100 * 2**20
    # The pod's own limit is tighter than its container's: that one decides.
    write(root / "kubepods/pod1", memory__max=str(3 * GIB // 2), memory__current=str(14 * GIB // 10))
    assert cgroup_memory_room(str(proc), str(root)) == 3 * GIB // 2 - 14 * GIB // 10
    # Usage over the limit (reclaim pending) leaves nothing, not a negative budget.
    write(root / "kubepods/pod1", memory__max=str(GIB), memory__current=str(2 * GIB))
    assert cgroup_memory_room(str(proc), str(root)) == 0


def test_v1_in_a_container_reads_the_mount_root(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu,cpuacct:/docker/abc\n5:memory:/docker/abc\n0::/\n")
    root = tmp_path / "sys"  # the container sees its own cgroup at the root of the mount
    write(root / "memory", memory__limit_in_bytes=str(2 * GIB), memory__usage_in_bytes=str(GIB // 2),
          memory__stat="cache 10\ntotal_inactive_file 0\n")
    assert cgroup_memory_room(str(proc), str(root)) == 3 * GIB // 2


def test_no_limit_or_no_cgroup_is_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/\n0::/\n")
    root = tmp_path / "sys"
    write(root / "memory", memory__limit_in_bytes="9223372036854771712", memory__usage_in_bytes=str(GIB))
    write(root, memory__max="max", memory__current=str(GIB))
    assert cgroup_memory_room(str(proc), str(root)) is None
    assert cgroup_memory_room(str(tmp_path / "missing"), str(root)) is None


def test_default_budget_is_a_share_of_the_cgroups_room(monkeypatch):
    monkeypatch.setattr(kv_budget, "_mem_available_bytes", lambda: 20 * GIB)
    monkeypatch.setattr(kv_budget, "cgroup_memory_room", lambda: GIB)
    assert default_kv_cache_bytes() == int(0.3 * GIB)
    monkeypatch.setattr(kv_budget, "cgroup_memory_room", lambda: None)
    assert default_kv_cache_bytes() == 4 * GIB  # the CPU cap, from the machine's 20 GiB


def test_a_specontext_pool_holds_a_full_length_sequence_and_its_buffer(llama_dir):
    """The blocks a pool is cut to (every running sequence at max_model_len) count SpeContext's buffer
    blocks too: without them a sequence near max_model_len could never get its buffer."""
    from kvflow.attention.kv_spec import KVCacheSpec
    from kvflow.config import EngineConfig
    from kvflow.worker.kv_budget import num_kv_blocks

    plain = EngineConfig.create(str(llama_dir), kv_cache_memory=1.0, max_num_seqs=2)
    m = plain.model
    spec = KVCacheSpec.dense(m.num_layers, m.num_kv_heads, m.head_dim, 16, m.dtype)
    table = -(-m.max_model_len // 16)
    assert num_kv_blocks(plain, spec) == 2 * table
    sparse = EngineConfig.create(str(llama_dir), kv_cache_memory=1.0, max_num_seqs=2, kv_policy="specontext",
                                 kv_budget=64)
    assert num_kv_blocks(sparse, spec) == 2 * (table + 64 // 16)
