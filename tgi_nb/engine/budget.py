"""What this process may use: its memory budget and its CPU count, read from the cgroup and /proc.

The budget is what this process may really use (:func:`read_memory_budget`): in a container (Binder, Colab,
JupyterHub, Kubernetes) the cgroup's limit minus its usage, which is often far below the host's ``MemAvailable``
that ``/proc/meminfo`` reports there. The CPU count is the affinity mask bounded by the cgroup's CPU quota
(:func:`choose_num_threads`). Both read files under a root that tests (and ``TGI_NB_CGROUP_ROOT`` /
``TGI_NB_PROC_ROOT``) point at fixture folders. What the engine does with the budget (the KV cache's size and
every limit) is :mod:`tgi_nb.engine.capacity`'s to decide.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages, about 2**63); anything above this is none.
_NO_LIMIT = 1 << 60

_DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
_DEFAULT_PROC_ROOT = "/proc"


# ----------------------------------------------------------------------------------------------------------
# Reading cgroup files
# ----------------------------------------------------------------------------------------------------------

def _roots(cgroup_root: Optional[str | Path], proc_root: Optional[str | Path]) -> tuple[Path, Path]:
    cgroup = cgroup_root or os.environ.get("TGI_NB_CGROUP_ROOT") or _DEFAULT_CGROUP_ROOT
    proc = proc_root or os.environ.get("TGI_NB_PROC_ROOT") or _DEFAULT_PROC_ROOT
    return Path(cgroup), Path(proc)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> Optional[int]:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _own_cgroups(proc: Path) -> dict[str, str]:
    """Controller name -> this process's cgroup path, from /proc/self/cgroup ("" is cgroup v2's unified entry)."""
    out: dict[str, str] = {}
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup folders from the process's own up to the mount's root (limits of every ancestor apply).
    Inside a container the process's path is often not visible under the mount: then the root alone."""
    own = mount / path.lstrip("/")
    if not own.is_dir() or mount not in (own, *own.parents):
        return [mount]
    levels = [own]
    while levels[-1] != mount:
        levels.append(levels[-1].parent)
    return levels


def _cgroup_dirs(cgroup: Path, proc: Path, controller: str) -> tuple[Optional[str], list[Path]]:
    """("v2" | "v1" | None, the folders to read ``controller``'s files in, innermost first)."""
    own = _own_cgroups(proc)
    v1_names = {"memory": ("memory",), "cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu")}[controller]
    if controller in own:
        for name in v1_names:
            if (cgroup / name).is_dir():
                return "v1", _levels(cgroup / name, own[controller])
    for mount in (cgroup, cgroup / "unified"):   # unified alone, or the v2 part of a hybrid layout
        if (mount / "cgroup.controllers").exists():
            controllers = (_read(mount / "cgroup.controllers") or "").split()
            levels = _levels(mount, own.get("", "/"))
            # the root of a v2 tree has no memory.max / cpu.max: usable when a level below has them
            if controller in controllers or any((d / f"{controller}.max").exists() for d in levels):
                return "v2", levels
    return None, []


def _process_rss(proc: Path) -> int:
    for line in (_read(proc / "self" / "status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _mem_available(proc: Path) -> Optional[int]:
    # MemAvailable counts reclaimable page cache; MemFree alone would say a busy host is full.
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What this process may still allocate, and where that figure comes from.

    - ``available``: the host's ``MemAvailable`` (None where /proc/meminfo is missing).
    - ``cgroup_limit`` / ``cgroup_usage``: the tightest cgroup memory limit over the process's cgroup and its
      ancestors, and that cgroup's usage (None without a limit).
    - ``process_rss``: what this process holds now (VmRSS), already inside ``cgroup_usage``.
    - ``reserved``: KV cache bytes other engines in this process have planned but not yet touched.
    - ``headroom``: the smaller of the two free figures, minus ``reserved``; None when nothing is known.

    Example:
        >>> b = MemoryBudget(available=20 << 30, cgroup_limit=2 << 30, cgroup_usage=1 << 30, process_rss=1 << 30)
        >>> b.headroom == 1 << 30, b.source
        (True, 'cgroup')
    """

    available: Optional[int] = None
    cgroup_limit: Optional[int] = None
    cgroup_usage: Optional[int] = None
    process_rss: int = 0
    reserved: int = 0
    cgroup_version: Optional[str] = None

    @property
    def source(self) -> str:
        """``cgroup`` or ``meminfo``: which of the two free figures is the smaller."""
        cgroup_free = self._cgroup_free()
        if cgroup_free is not None and (self.available is None or cgroup_free <= self.available):
            return "cgroup"
        return "meminfo" if self.available is not None else "unknown"

    def _cgroup_free(self) -> Optional[int]:
        if self.cgroup_limit is None:
            return None
        return max(0, self.cgroup_limit - (self.cgroup_usage or 0))

    @property
    def headroom(self) -> Optional[int]:
        frees = [x for x in (self._cgroup_free(), self.available) if x is not None]
        return max(0, min(frees) - self.reserved) if frees else None

    def describe(self) -> str:
        """One line for the log: the headroom and where it comes from.

        Example:
            >>> MemoryBudget(available=8 << 30).describe()
            'memory headroom 8.0 GiB (MemAvailable 8.0 GiB, no cgroup limit, this process 0.0 GiB)'
        """
        gib = 2 ** 30
        limit = (f"cgroup {self.cgroup_version} limit {self.cgroup_limit / gib:.1f} GiB with "
                 f"{(self.cgroup_usage or 0) / gib:.1f} GiB used" if self.cgroup_limit is not None
                 else "no cgroup limit")
        avail = f"MemAvailable {self.available / gib:.1f} GiB" if self.available is not None else "no MemAvailable"
        reserved = f", {self.reserved / gib:.1f} GiB planned by other engines here" if self.reserved else ""
        head = f"{self.headroom / gib:.1f} GiB" if self.headroom is not None else "unknown"
        return f"memory headroom {head} ({avail}, {limit}, this process {self.process_rss / gib:.1f} GiB{reserved})"


def read_memory_budget(cgroup_root: Optional[str | Path] = None, proc_root: Optional[str | Path] = None
                       ) -> MemoryBudget:
    """This process's memory budget from the cgroup (v2 ``memory.max``/``memory.current``, v1
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``, over its cgroup and every ancestor) and ``MemAvailable``.

    ``cgroup_root`` (default ``$TGI_NB_CGROUP_ROOT`` or /sys/fs/cgroup) and ``proc_root`` (default
    ``$TGI_NB_PROC_ROOT`` or /proc) may point at fixture folders. A cgroup folder with a limit but no usage
    file counts this process's VmRSS as its usage (a container holding only this process).

    Example:
        >>> budget = read_memory_budget()
        >>> budget.headroom is None or budget.headroom >= 0
        True
    """
    cgroup, proc = _roots(cgroup_root, proc_root)
    rss = _process_rss(proc)
    version, dirs = _cgroup_dirs(cgroup, proc, "memory")
    names = {"v2": ("memory.max", "memory.current"), "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}
    limit = usage = None
    best_free = None
    for folder in dirs:
        limit_file, usage_file = names[version]
        value = _read(folder / limit_file)
        if value is None or value == "max":
            continue
        try:
            level_limit = int(value)
        except ValueError:
            continue
        if level_limit >= _NO_LIMIT:
            continue
        level_usage = _read_int(folder / usage_file)
        level_usage = rss if level_usage is None else level_usage
        free = level_limit - level_usage
        if best_free is None or free < best_free:
            best_free, limit, usage = free, level_limit, level_usage
    return MemoryBudget(available=_mem_available(proc), cgroup_limit=limit, cgroup_usage=usage, process_rss=rss,
                        reserved=reserved_kv_bytes(), cgroup_version=version if limit is not None else None)


# KV caches are mapped but untouched at first, so they are not in any usage figure yet: engines in one process
# (several endpoints in a notebook kernel) register what they planned, and later plans leave it aside.
_reservations: dict[int, int] = {}
_reservations_lock = threading.Lock()


def reserve_kv_bytes(owner: object, nbytes: int) -> None:
    """Record that ``owner`` (an engine) planned a KV cache of ``nbytes``; :func:`release_kv_bytes` undoes it.

    Example:
        >>> owner = object(); before = reserved_kv_bytes()
        >>> reserve_kv_bytes(owner, 1 << 20); reserved_kv_bytes() - before
        1048576
        >>> release_kv_bytes(owner); reserved_kv_bytes() - before
        0
    """
    with _reservations_lock:
        _reservations[id(owner)] = nbytes


def release_kv_bytes(owner: object) -> None:
    """Forget ``owner``'s KV cache reservation (its engine shut down)."""
    with _reservations_lock:
        _reservations.pop(id(owner), None)


def reserved_kv_bytes() -> int:
    """KV cache bytes planned by live engines of this process."""
    with _reservations_lock:
        return sum(_reservations.values())


# ----------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """How many threads the engine's kernels use, and why (for the log).

    Example:
        >>> ThreadChoice(2, "2 CPUs in the affinity mask").count
        2
    """

    count: int
    reason: str


def cpu_quota(cgroup_root: Optional[str | Path] = None, proc_root: Optional[str | Path] = None
              ) -> Optional[float]:
    """CPUs' worth of time the cgroup allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, the
    tightest over the process's cgroup and its ancestors), or None without a quota.

    Example:
        >>> q = cpu_quota()
        >>> q is None or q > 0
        True
    """
    cgroup, proc = _roots(cgroup_root, proc_root)
    version, dirs = _cgroup_dirs(cgroup, proc, "cpu")
    best = None
    for folder in dirs:
        if version == "v2":
            fields = (_read(folder / "cpu.max") or "max").split()
            if fields[0] == "max":
                continue
            quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
        else:
            quota, period = _read_int(folder / "cpu.cfs_quota_us"), _read_int(folder / "cpu.cfs_period_us")
            if quota is None or quota < 0 or not period:
                continue
        if quota > 0 and period > 0:
            cpus = quota / period
            best = cpus if best is None else min(best, cpus)
    return best


def choose_num_threads(requested: Optional[int] = None, cgroup_root: Optional[str | Path] = None,
                       proc_root: Optional[str | Path] = None, affinity: Optional[set[int]] = None) -> ThreadChoice:
    """Threads for torch's intra-op pool and the native kernels: the CPUs this process may run on
    (``sched_getaffinity``), lowered to the cgroup's CPU quota rounded up (a 1.5-CPU quota gets 2 threads: a
    thread that waits for its share still beats one that is not there). ``requested`` (``num_threads``) wins.

    Example:
        >>> choose_num_threads(3).count
        3
        >>> choose_num_threads().count >= 1
        True
    """
    if requested:
        return ThreadChoice(requested, f"{requested} threads as configured (num_threads)")
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # not on Linux
            affinity = set(range(os.cpu_count() or 1))
    cpus = max(1, len(affinity))
    quota = cpu_quota(cgroup_root, proc_root)
    if quota is not None and math.ceil(quota) < cpus:
        count = max(1, math.ceil(quota))
        return ThreadChoice(count, f"{count} threads: the cgroup CPU quota is {quota:g} CPUs "
                                   f"({cpus} CPUs in the affinity mask)")
    quota_note = f", CPU quota {quota:g}" if quota is not None else ", no CPU quota"
    return ThreadChoice(cpus, f"{cpus} threads: {cpus} CPUs in the affinity mask{quota_note}")

