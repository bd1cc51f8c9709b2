"""What the process may use: CPUs from affinity and a cgroup quota, memory from MemAvailable and a cgroup limit."""
import os
import subprocess
import sys

import pytest

from patchgen.runtime import limits
from patchgen.runtime.memory import MIB, cap_to_available


@pytest.fixture
def fake_system(tmp_path, monkeypatch):
    """A cgroup tree and /proc files under tmp_path: write files into it, then call the limits functions."""
    root = tmp_path / "cgroup"
    monkeypatch.setattr(limits, "CGROUP_ROOT", root)
    monkeypatch.setattr(limits, "PROC_CGROUP", tmp_path / "self_cgroup")
    monkeypatch.setattr(limits, "PROC_MEMINFO", tmp_path / "meminfo")
    (tmp_path / "meminfo").write_text("MemTotal: 8000000 kB\nMemAvailable:    1048576 kB\n")
    return tmp_path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.quick
@pytest.mark.parametrize("files,quota", [
    ({}, None),
    ({"job/cpu.max": "max 100000"}, None),
    ({"job/cpu.max": "150000 100000"}, 1.5),  # a container's --cpus=1.5
    ({"cpu.max": "100000 100000", "job/cpu.max": "300000 100000"}, 1.0),  # a parent's quota binds too
])
def test_cpu_quota_cgroup_v2(fake_system, files, quota):
    write(fake_system / "self_cgroup", "0::/job\n")
    (fake_system / "cgroup" / "job").mkdir(parents=True)
    for name, text in files.items():
        write(fake_system / "cgroup" / name, text)
    assert limits.cpu_quota() == quota


@pytest.mark.quick
def test_cpu_quota_cgroup_v1(fake_system):
    write(fake_system / "self_cgroup", "4:memory:/job\n3:cpu,cpuacct:/job\n")
    write(fake_system / "cgroup" / "cpu" / "job" / "cpu.cfs_quota_us", "50000")
    write(fake_system / "cgroup" / "cpu" / "job" / "cpu.cfs_period_us", "100000")
    assert limits.cpu_quota() == 0.5
    assert limits.available_cpus() == 1  # rounded up, never 0


@pytest.mark.quick
def test_available_memory_takes_the_tighter_of_meminfo_and_cgroup(fake_system):
    write(fake_system / "self_cgroup", "0::/job\n")
    assert limits.available_memory(100 * MIB) == (100 * MIB + 1024 * MIB, "MemAvailable")
    write(fake_system / "cgroup" / "job" / "memory.max", str(512 * MIB))
    write(fake_system / "cgroup" / "job" / "memory.current", str(300 * MIB))
    assert limits.available_memory(100 * MIB) == (312 * MIB, "the cgroup memory limit")
    write(fake_system / "cgroup" / "job" / "memory.stat", f"anon 1\nfile 2\ninactive_file {50 * MIB}\n")
    assert limits.available_memory(100 * MIB) == (362 * MIB, "the cgroup memory limit")  # cache is reclaimable
    write(fake_system / "cgroup" / "job" / "memory.max", "max")
    assert limits.available_memory(100 * MIB)[1] == "MemAvailable"


@pytest.mark.quick
def test_budget_above_what_the_process_can_have_is_capped(fake_system):
    budget, limited_by = cap_to_available(99999999 * 2**30)
    assert budget < 2 * 2**30 and limited_by == "MemAvailable"
    assert cap_to_available(10 * MIB) == (10 * MIB, "")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_default_threads_follow_affinity():
    """Under `taskset -c 0` the --help default and the range are 1, as is the run's default."""
    code = ("import sys, runpy; sys.argv = ['patchgen-sample', '--help']; "
            "runpy.run_module('patchgen.cli.sample', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert r.returncode == 0, r.stderr
    shown = " ".join(r.stdout.split())
    assert "may use (1);" in shown and "--patch-batch, 1: those CPUs" in shown and "[1<=x<=1]" in shown, shown
    r = subprocess.run([sys.executable, "-c", "from patchgen.runtime.model import default_threads; "
                        "print(default_threads())"], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert r.stdout.strip() == "1"
