"""How much the engine may take and run: the memory and CPU budgets, and the one capacity planner.

Every limit that bounds a request or the KV cache (``max_input_tokens``, ``max_total_tokens``,
``max_batch_prefill_tokens``, ``max_batch_total_tokens``, the KV cache's bytes) is decided by
:func:`plan_capacity`, a pure function of the model's shape, the limits asked for and the memory the
cache may take. ``tgi-nb serve`` and notebook endpoints both reach it through :class:`~tgi_nb.engine.LLMEngine`,
so they agree, and its ``reasons`` are what the log, ``/info`` readers and the endpoint's warnings show.

The budget is what this process may really use (:func:`read_memory_budget`): in a container (Binder, Colab,
JupyterHub, Kubernetes) the cgroup's limit minus its usage, which is often far below the host's ``MemAvailable``
that ``/proc/meminfo`` reports there. The CPU count is the affinity mask bounded by the cgroup's CPU quota
(:func:`choose_num_threads`). Both read files under a root that tests (and ``TGI_NB_CGROUP_ROOT`` /
``TGI_NB_PROC_ROOT``) point at fixture folders.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .sampling_params import ValidationError

# The default KV cache holds this many tokens per sequence that may run at once: a chat turn (system prompt,
# question, answer) is a few hundred tokens; a longer request still fits, since the cache always holds at
# least one max_total_tokens request.
TYPICAL_SEQUENCE_TOKENS = 512
# Share of the memory headroom the KV cache may take by default; the rest is for activations, the Python heap,
# the HTTP server and the kernel around it.
KV_HEADROOM_SHARE = 0.7
# On CUDA the cache takes this share of the free device memory, the rest is for activations.
KV_CUDA_FREE_SHARE = 0.8
# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages, about 2**63); anything above this is none.
_NO_LIMIT = 1 << 60

_DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
_DEFAULT_PROC_ROOT = "/proc"


class CapacityError(ValidationError):
    """The limits asked for cannot work in the memory there is; the message names the field and the numbers."""


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


# ----------------------------------------------------------------------------------------------------------
# The capacity planner
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModelShape:
    """What sizes a model's KV cache: layers, kv heads and head size, and its context in tokens.

    Example:
        >>> ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, context=8192).kv_bytes_per_token(4)
        46080
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    context: int

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class CapacityRequest:
    """The limits asked for (None: choose), named as text-generation-launcher names them.

    ``kv_cache_memory`` and ``max_batch_total_tokens`` set the cache exactly (the latter lowered only when it
    does not fit the memory budget); ``max_concurrent_requests`` and ``max_num_seqs`` size the default cache.
    """

    max_input_tokens: Optional[int] = None
    max_total_tokens: Optional[int] = None
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    max_num_seqs: int = 64
    max_concurrent_requests: Optional[int] = None
    block_size: int = 16
    kv_dtype_bytes: int = 4


@dataclass(frozen=True, slots=True)
class Lowering:
    """One limit the planner set below what was asked: the field, both values and why.

    Example:
        >>> Lowering("max_total_tokens", 32000, 2048, "more than the model's context (2048 tokens)").message()
        "max_total_tokens=32000 is more than the model's context (2048 tokens): lowered to 2048."
        >>> Lowering("max_total_tokens", 32000, 2048, "too long").message("MAX_TOTAL_TOKENS")
        'MAX_TOTAL_TOKENS=32000 is too long: lowered to 2048.'
    """

    field: str
    requested: int
    used: int
    why: str

    def message(self, name: Optional[str] = None) -> str:
        """The sentence a log line or an endpoint warning shows, naming the option as the user wrote it."""
        return f"{name or self.field}={self.requested} is {self.why}: lowered to {self.used}."


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The limits the engine uses, the KV cache they take, and why anything is below what was asked.

    ``sizing`` says how the KV cache size was chosen; ``lowerings`` lists each limit set below the request.

    Example:
        >>> plan = plan_capacity(ModelShape(30, 3, 64, 8192), CapacityRequest(), kv_budget=1 << 30)
        >>> plan.max_total_tokens, plan.max_batch_total_tokens, plan.kv_cache_bytes // 2**20
        (8192, 23296, 1023)
    """

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    num_blocks: int
    block_size: int
    kv_bytes_per_token: int
    kv_budget: Optional[int]
    sizing: str
    lowerings: tuple[Lowering, ...] = field(default_factory=tuple)

    @property
    def kv_cache_bytes(self) -> int:
        return self.max_batch_total_tokens * self.kv_bytes_per_token

    def reasons(self) -> list[str]:
        """Every lowering as a sentence, then how the cache was sized.

        Example:
            >>> plan_capacity(ModelShape(2, 1, 8, 64), CapacityRequest(max_total_tokens=100), None).reasons()[0]
            "max_total_tokens=100 is more than the model's context (64 tokens): lowered to 64."
        """
        return [lowering.message() for lowering in self.lowerings] + [self.sizing]


def kv_budget_bytes(headroom: Optional[int], device: str = "cpu") -> Optional[int]:
    """The bytes a KV cache may take by default: ``KV_HEADROOM_SHARE`` of the memory headroom on the CPU;
    on CUDA ``KV_CUDA_FREE_SHARE`` of the device's free memory. None when the headroom is unknown.

    Example:
        >>> kv_budget_bytes(10 << 30) / 2**30
        7.0
    """
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * KV_CUDA_FREE_SHARE)
    return None if headroom is None else int(headroom * KV_HEADROOM_SHARE)


def plan_capacity(model: ModelShape, requested: CapacityRequest, kv_budget: Optional[int]) -> CapacityPlan:
    """Decide every limit from the model, what was asked and the bytes the KV cache may take (``kv_budget``;
    None: no limit known). Pure: the same inputs always give the same plan.

    - ``max_total_tokens``: as asked, lowered to the model's context; by default the context. Lowered further
      when the memory cannot hold one such request.
    - KV cache: ``kv_cache_memory`` bytes exactly; else ``max_batch_total_tokens`` exactly unless it exceeds
      ``kv_budget``; else enough for ``min(max_num_seqs, max_concurrent_requests)`` sequences of
      ``TYPICAL_SEQUENCE_TOKENS`` and at least one ``max_total_tokens`` request, within ``kv_budget``.
    - ``max_input_tokens``: as asked, lowered below ``max_total_tokens``; by default ``max_total_tokens - 1``.
    - ``max_batch_prefill_tokens``: as asked, lowered to the cache's size.

    Raises :class:`CapacityError` when explicit limits contradict each other or the memory cannot hold even a
    short request.

    Example:
        >>> smollm2 = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, context=8192)
        >>> plan = plan_capacity(smollm2, CapacityRequest(max_total_tokens=4096), kv_budget=2 << 30)
        >>> plan.max_total_tokens, plan.max_input_tokens, plan.max_batch_total_tokens
        (4096, 4095, 32768)
        >>> small = plan_capacity(smollm2, CapacityRequest(max_batch_total_tokens=100_000), kv_budget=256 << 20)
        >>> small.max_batch_total_tokens, small.max_total_tokens
        (5824, 5824)
        >>> [x.field for x in small.lowerings]
        ['max_batch_total_tokens', 'max_total_tokens']
    """
    r = requested
    bs = r.block_size
    per_token = model.kv_bytes_per_token(r.kv_dtype_bytes)
    lowerings: list[Lowering] = []
    gib = 2 ** 30

    def lower(name: str, asked: int, used: int, why: str) -> int:
        lowerings.append(Lowering(name, asked, used, why))
        return used

    max_total = r.max_total_tokens
    if max_total is not None and max_total > model.context:
        max_total = lower("max_total_tokens", max_total, model.context,
                          f"more than the model's context ({model.context} tokens)")
    max_total = max_total or model.context
    budget_tokens = None if kv_budget is None else kv_budget // per_token // bs * bs

    if r.kv_cache_memory is not None:
        capacity = r.kv_cache_memory // per_token // bs * bs
        sizing = (f"KV cache: kv_cache_memory={r.kv_cache_memory} bytes as configured, {capacity} tokens at "
                  f"{per_token} bytes per token")
    elif r.max_batch_total_tokens is not None:
        capacity = r.max_batch_total_tokens
        if budget_tokens is not None and capacity > budget_tokens:
            capacity = lower("max_batch_total_tokens", capacity, budget_tokens,
                             f"a KV cache of {r.max_batch_total_tokens * per_token / gib:.2f} GiB, more than the "
                             f"{kv_budget / gib:.2f} GiB the memory budget gives it")
            sizing = f"KV cache: {capacity} tokens, all the memory budget gives it"
        else:
            sizing = f"KV cache: max_batch_total_tokens={capacity} as configured"
    else:
        seqs = min(r.max_num_seqs, r.max_concurrent_requests or r.max_num_seqs)
        typical = min(max_total, TYPICAL_SEQUENCE_TOKENS)
        wanted = -(-max(max_total, seqs * typical) // bs) * bs
        capacity = wanted if budget_tokens is None else min(wanted, budget_tokens)
        sizing = (f"KV cache sized for the work: {seqs} sequences of {typical} tokens, and one of "
                  f"max_total_tokens={max_total}: {wanted} tokens")
        if capacity < wanted:
            sizing += f", lowered to {capacity} tokens, all the memory budget ({kv_budget / gib:.2f} GiB) holds"
    capacity = capacity // bs * bs
    if capacity < bs:
        raise CapacityError(
            "max_batch_total_tokens",
            f"max_batch_total_tokens: the memory budget ({(kv_budget or 0) / 2**20:.0f} MiB for the KV cache) "
            f"cannot hold one block of {bs} tokens at {per_token} bytes per token; free memory or raise the "
            f"container's limit")

    explicit_capacity = r.kv_cache_memory is not None or (
        r.max_batch_total_tokens is not None and not any(x.field == "max_batch_total_tokens" for x in lowerings))
    if max_total > capacity:
        if explicit_capacity and r.max_total_tokens is not None:
            name = "kv_cache_memory" if r.kv_cache_memory is not None else "max_batch_total_tokens"
            raise CapacityError("max_total_tokens", f"max_total_tokens ({max_total}) exceeds the KV cache capacity "
                                                    f"{name} ({capacity} tokens)")
        why = ("more than the KV cache holds" if explicit_capacity
               else f"more than the KV cache the memory budget allows holds ({capacity} tokens)")
        max_total = lower("max_total_tokens", r.max_total_tokens or max_total, capacity, why)

    max_input = r.max_input_tokens
    if max_input is not None and max_input >= max_total:
        max_input = lower("max_input_tokens", max_input, max_total - 1,
                          f"not below max_total_tokens ({max_total})")
    max_input = max_input or max_total - 1
    if max_input < 1:
        raise CapacityError("max_total_tokens", f"max_total_tokens ({max_total}) must be >= 2")

    prefill = r.max_batch_prefill_tokens
    if prefill > capacity:
        prefill = lower("max_batch_prefill_tokens", prefill, capacity, f"more than the KV cache ({capacity} tokens)")
    sizing += f"; {capacity * per_token / gib:.2f} GiB"
    return CapacityPlan(max_input_tokens=max_input, max_total_tokens=max_total, max_batch_prefill_tokens=prefill,
                        max_batch_total_tokens=capacity, num_blocks=capacity // bs, block_size=bs,
                        kv_bytes_per_token=per_token, kv_budget=kv_budget, sizing=sizing,
                        lowerings=tuple(lowerings))
