"""Fake /sys/fs/cgroup and /proc trees, laid out as the kernel lays them out, for the memory and CPU budgets.

``TGI_NB_CGROUP_ROOT`` and ``TGI_NB_PROC_ROOT`` (or the functions' ``cgroup_root`` / ``proc_root``) point the
engine at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

GIB = 1 << 30
MEMINFO = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available} kB\n"
STATUS = "Name:\tpython\nVmHWM:\t  900000 kB\nVmRSS:\t  {rss} kB\nThreads:\t4\n"


def write_fake_system(root: Path, *, version: Optional[str], memory_max: Optional[int] = None,
                      memory_current: Optional[int] = None, cpu_quota: Optional[int] = None, cpu_period: int = 100000,
                      available: int = 20 * GIB, rss: int = 500 << 20, own_path: str = "/user.slice/notebook",
                      parent_memory_max: Optional[int] = None) -> tuple[Path, Path]:
    """Write a cgroup tree (``version`` "v2", "v1" or None for no cgroup files) and a /proc with meminfo,
    self/status and self/cgroup; return (cgroup_root, proc_root). ``memory_current=None`` leaves the usage file
    out. The limits sit in the process's own cgroup ``own_path``; ``parent_memory_max`` puts one on its parent."""
    cgroup, proc = root / "cgroup", root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(MEMINFO.format(available=available // 1024))
    (proc / "self" / "status").write_text(STATUS.format(rss=rss // 1024))
    cgroup.mkdir()
    if version == "v2":
        (proc / "self" / "cgroup").write_text(f"0::{own_path}\n")
        (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        own = cgroup / own_path.lstrip("/")
        own.mkdir(parents=True)
        (own / "memory.max").write_text(f"{memory_max}\n" if memory_max is not None else "max\n")
        if memory_current is not None:
            (own / "memory.current").write_text(f"{memory_current}\n")
        (own / "cpu.max").write_text(f"{cpu_quota} {cpu_period}\n" if cpu_quota else f"max {cpu_period}\n")
        if parent_memory_max is not None:
            (own.parent / "memory.max").write_text(f"{parent_memory_max}\n")
            (own.parent / "memory.current").write_text(f"{memory_current or 0}\n")
    elif version == "v1":
        (proc / "self" / "cgroup").write_text(
            f"12:memory:{own_path}\n4:cpu,cpuacct:{own_path}\n1:name=systemd:/\n0::/\n")
        memory, cpu = cgroup / "memory" / own_path.lstrip("/"), cgroup / "cpu,cpuacct" / own_path.lstrip("/")
        memory.mkdir(parents=True)
        cpu.mkdir(parents=True)
        (cgroup / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
        (memory / "memory.limit_in_bytes").write_text(
            f"{memory_max if memory_max is not None else 9223372036854771712}\n")
        if memory_current is not None:
            (memory / "memory.usage_in_bytes").write_text(f"{memory_current}\n")
        (cpu / "cpu.cfs_quota_us").write_text(f"{cpu_quota if cpu_quota else -1}\n")
        (cpu / "cpu.cfs_period_us").write_text(f"{cpu_period}\n")
    else:
        (proc / "self" / "cgroup").write_text("0::/\n")
    return cgroup, proc
