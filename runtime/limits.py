"""What this process may use: CPUs (affinity, cgroup CPU quota) and memory (MemAvailable, cgroup limit).

Linux reports these in /proc and /sys/fs/cgroup (v2 unified, or v1 per controller); elsewhere the
answers fall back to os.cpu_count() and "no limit known". Kept to the standard library: loky's
cpu_count() does the CPU part too, but importing loky (and cloudpickle, its executor) would raise the
edge path's peak RSS, the one number this runtime exists to keep low.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroup path per hierarchy
PROC_MEMINFO = Path("/proc/meminfo")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _cgroup_dirs(controller: str) -> Iterator[Path]:
    """This process's cgroup folder for `controller` and its ancestors (a limit anywhere above applies too).

    cgroup v2 lists one line "0::/path"; v1 one line per hierarchy, "N:cpu,cpuacct:/path". Inside a
    container the folder is often mounted as the root, so the mount root itself is tried as well.
    """
    text = _read(PROC_CGROUP) or ""
    for line in text.splitlines():
        _, controllers, rel = line.split(":", 2)
        base = CGROUP_ROOT if controllers == "" else CGROUP_ROOT / controller
        if controllers != "" and controller not in controllers.split(","):
            continue
        if not base.is_dir():
            continue
        path = base / rel.lstrip("/")
        seen = set()
        for folder in (path, *path.parents):
            if folder in seen or not str(folder).startswith(str(base)):
                break
            seen.add(folder)
            yield folder
        if base not in seen:
            yield base


def cpu_quota() -> Optional[float]:
    """The tightest cgroup CPU quota in CPUs (1.5 = one and a half), or None when none is set."""
    quotas = []
    for folder in _cgroup_dirs("cpu"):
        v2 = _read(folder / "cpu.max")  # "max 100000" or "150000 100000"
        if v2:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (rounded up), >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(cpus, 1)


def _meminfo_kib(field: str) -> Optional[int]:
    for line in (_read(PROC_MEMINFO) or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _inactive_file(folder: Path) -> int:
    """Bytes of the cgroup's page cache that the kernel reclaims before it would OOM-kill (memory.stat)."""
    stat = dict(line.partition(" ")[::2] for line in (_read(folder / "memory.stat") or "").splitlines())
    value = stat.get("total_inactive_file", stat.get("inactive_file", "0"))  # v1 (with children), v2
    return int(value) if value.isdigit() else 0


def cgroup_memory_headroom() -> Optional[int]:
    """Bytes the tightest cgroup memory limit still allows, or None when none is set.

    The cgroup's usage counts its page cache too (the model file, the libraries just read); like
    docker stats' "working set", inactive file pages are taken as free, since they are reclaimed first."""
    rooms = []
    for folder in _cgroup_dirs("memory"):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, usage = _read(folder / limit_name), _read(folder / usage_name)
            if limit and usage and limit.isdigit() and int(limit) < 2**60:  # v1 "no limit" is ~2**63
                rooms.append(int(limit) - max(int(usage) - _inactive_file(folder), 0))
    return min(rooms) if rooms else None


def available_memory(current_rss: int) -> tuple[Optional[int], str]:
    """(bytes this process can reach as peak RSS, what limits it), or (None, "") when nothing is known.

    That is what it holds now (`current_rss`) plus what it may still take: the kernel's MemAvailable
    and, in a container, the headroom under its cgroup memory limit, whichever is smaller.
    """
    options = []
    kib = _meminfo_kib("MemAvailable")
    if kib is not None:
        options.append((current_rss + kib * 1024, "MemAvailable"))
    room = cgroup_memory_headroom()
    if room is not None:
        options.append((current_rss + max(room, 0), "the cgroup memory limit"))
    return min(options) if options else (None, "")
