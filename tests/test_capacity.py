"""The memory and CPU budgets (cgroup v1 / v2 / no-limit trees from fixtures) and the one capacity planner that
``tgi-nb serve`` and endpoints share."""

from __future__ import annotations

import pytest

from cgroup_fixtures import GIB, write_fake_system
from tgi_nb.engine.budget import choose_num_threads, cpu_quota, read_memory_budget, release_kv_bytes, reserve_kv_bytes
from tgi_nb.engine.capacity import (KV_HEADROOM_SHARE, TYPICAL_SEQUENCE_TOKENS, CapacityError, CapacityRequest,
                                    ModelShape, kv_budget_bytes, plan_capacity)

SMOLLM2 = ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, context=8192)
PER_TOKEN = SMOLLM2.kv_bytes_per_token(4)   # 46,080 bytes in float32


# ---------------------------------------------------------------------------------------------- memory budget

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_is_the_budget_when_tighter_than_meminfo(tmp_path, version):
    cgroup, proc = write_fake_system(tmp_path, version=version, memory_max=2 * GIB, memory_current=GIB // 2,
                                     available=20 * GIB)
    budget = read_memory_budget(cgroup, proc)
    assert (budget.cgroup_limit, budget.cgroup_usage, budget.available) == (2 * GIB, GIB // 2, 20 * GIB)
    assert budget.headroom == 2 * GIB - GIB // 2
    assert budget.source == "cgroup" and budget.cgroup_version == version
    assert "cgroup " + version in budget.describe()


@pytest.mark.parametrize("version", ["v1", "v2", None])
def test_without_a_cgroup_limit_meminfo_is_the_budget(tmp_path, version):
    cgroup, proc = write_fake_system(tmp_path, version=version, memory_max=None, memory_current=GIB,
                                     available=3 * GIB)
    budget = read_memory_budget(cgroup, proc)
    assert budget.cgroup_limit is None and budget.headroom == 3 * GIB and budget.source == "meminfo"


def test_meminfo_wins_when_the_host_has_less_free_than_the_cgroup_allows(tmp_path):
    cgroup, proc = write_fake_system(tmp_path, version="v2", memory_max=16 * GIB, memory_current=GIB,
                                     available=2 * GIB)
    budget = read_memory_budget(cgroup, proc)
    assert budget.headroom == 2 * GIB and budget.source == "meminfo"


def test_a_tighter_parent_cgroup_limit_applies(tmp_path):
    cgroup, proc = write_fake_system(tmp_path, version="v2", memory_max=8 * GIB, memory_current=GIB,
                                     parent_memory_max=3 * GIB)
    assert read_memory_budget(cgroup, proc).headroom == 2 * GIB


def test_a_limit_without_a_usage_file_counts_this_process(tmp_path):
    # what benchmarks and the end-to-end test inject: a 2 GB container holding only this process
    cgroup, proc = write_fake_system(tmp_path, version="v2", memory_max=2 * GIB, memory_current=None, rss=GIB // 4)
    budget = read_memory_budget(cgroup, proc)
    assert budget.cgroup_usage == GIB // 4 and budget.headroom == 2 * GIB - GIB // 4


def test_kv_caches_planned_by_other_engines_are_left_aside(tmp_path):
    cgroup, proc = write_fake_system(tmp_path, version="v1", memory_max=2 * GIB, memory_current=0)
    owner = object()
    reserve_kv_bytes(owner, GIB // 2)
    try:
        assert read_memory_budget(cgroup, proc).headroom == 2 * GIB - GIB // 2
    finally:
        release_kv_bytes(owner)
    assert read_memory_budget(cgroup, proc).headroom == 2 * GIB


def test_environment_variables_point_at_the_fixture(tmp_path, monkeypatch):
    cgroup, proc = write_fake_system(tmp_path, version="v2", memory_max=GIB, memory_current=GIB // 4)
    monkeypatch.setenv("TGI_NB_CGROUP_ROOT", str(cgroup))
    monkeypatch.setenv("TGI_NB_PROC_ROOT", str(proc))
    assert read_memory_budget().headroom == GIB - GIB // 4


# ---------------------------------------------------------------------------------------------- threads

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cpu_quota_bounds_the_thread_count(tmp_path, version):
    cgroup, proc = write_fake_system(tmp_path, version=version, cpu_quota=150000, cpu_period=100000)
    assert cpu_quota(cgroup, proc) == 1.5
    choice = choose_num_threads(cgroup_root=cgroup, proc_root=proc, affinity=set(range(64)))
    assert choice.count == 2   # 1.5 CPUs rounded up
    assert "quota is 1.5 CPUs" in choice.reason and "64 CPUs" in choice.reason


@pytest.mark.parametrize("version", ["v1", "v2", None])
def test_without_a_quota_the_affinity_mask_decides(tmp_path, version):
    cgroup, proc = write_fake_system(tmp_path, version=version, cpu_quota=None)
    assert cpu_quota(cgroup, proc) is None
    choice = choose_num_threads(cgroup_root=cgroup, proc_root=proc, affinity={0, 1, 2})
    assert choice.count == 3 and "affinity mask" in choice.reason and "no CPU quota" in choice.reason


def test_a_quota_above_the_affinity_mask_changes_nothing_and_num_threads_wins(tmp_path):
    cgroup, proc = write_fake_system(tmp_path, version="v2", cpu_quota=800000)
    assert choose_num_threads(cgroup_root=cgroup, proc_root=proc, affinity={0, 1}).count == 2
    assert choose_num_threads(5, cgroup_root=cgroup, proc_root=proc, affinity={0, 1}).count == 5


# ---------------------------------------------------------------------------------------------- the planner

def test_default_cache_is_sized_for_the_work_not_the_host():
    plan = plan_capacity(SMOLLM2, CapacityRequest(max_num_seqs=64), kv_budget=100 * GIB)
    assert plan.max_total_tokens == 8192 and plan.max_input_tokens == 8191
    assert plan.max_batch_total_tokens == 64 * TYPICAL_SEQUENCE_TOKENS
    assert plan.kv_cache_bytes == 64 * TYPICAL_SEQUENCE_TOKENS * PER_TOKEN
    assert plan.lowerings == () and "64 sequences of 512 tokens" in plan.sizing


def test_fewer_concurrent_requests_size_a_smaller_cache_but_the_longest_request_always_fits():
    plan = plan_capacity(SMOLLM2, CapacityRequest(max_concurrent_requests=4), kv_budget=100 * GIB)
    assert plan.max_batch_total_tokens == 8192   # 4 x 512 < one request of max_total_tokens
    plan = plan_capacity(SMOLLM2, CapacityRequest(max_concurrent_requests=4, max_total_tokens=1000), 100 * GIB)
    assert plan.max_batch_total_tokens == 2048


def test_a_small_budget_lowers_the_cache_and_then_the_longest_request():
    budget = 200 * 2**20
    plan = plan_capacity(SMOLLM2, CapacityRequest(), kv_budget=budget)
    assert plan.max_batch_total_tokens == budget // PER_TOKEN // 16 * 16 == 4544
    assert plan.max_total_tokens == 4544 and plan.max_input_tokens == 4543
    [lowering] = plan.lowerings
    assert (lowering.field, lowering.requested, lowering.used) == ("max_total_tokens", 8192, 4544)
    assert "memory budget" in plan.sizing


def test_explicit_max_batch_total_tokens_is_exact_when_it_fits_and_lowered_when_not():
    assert plan_capacity(SMOLLM2, CapacityRequest(max_batch_total_tokens=10000), GIB).max_batch_total_tokens == 10000
    assert plan_capacity(SMOLLM2, CapacityRequest(max_batch_total_tokens=10000), None).max_batch_total_tokens == 10000
    plan = plan_capacity(SMOLLM2, CapacityRequest(max_batch_total_tokens=1_024_000), kv_budget=GIB)
    assert plan.max_batch_total_tokens == GIB // PER_TOKEN // 16 * 16
    assert plan.lowerings[0].field == "max_batch_total_tokens"
    assert "MAX_BATCH_TOTAL_TOKENS=1024000 is a KV cache of 43.95 GiB" in plan.lowerings[0].message(
        "MAX_BATCH_TOTAL_TOKENS")


def test_kv_cache_memory_is_exact_and_fp16_halves_the_bytes_per_token():
    plan = plan_capacity(SMOLLM2, CapacityRequest(kv_cache_memory=GIB, kv_dtype_bytes=2), kv_budget=None)
    assert plan.kv_bytes_per_token == PER_TOKEN // 2
    assert plan.max_batch_total_tokens == GIB // (PER_TOKEN // 2) // 16 * 16


def test_context_and_input_limits_are_lowered_with_reasons():
    plan = plan_capacity(SMOLLM2, CapacityRequest(max_total_tokens=32000, max_input_tokens=9000,
                                                  max_batch_prefill_tokens=4096), kv_budget=None)
    assert (plan.max_total_tokens, plan.max_input_tokens) == (8192, 8191)
    assert [x.field for x in plan.lowerings] == ["max_total_tokens", "max_input_tokens"]
    assert plan.reasons()[0] == "max_total_tokens=32000 is more than the model's context (8192 tokens): lowered to 8192."


def test_contradictions_and_impossible_budgets_name_the_field():
    with pytest.raises(CapacityError, match="max_total_tokens \\(4096\\) exceeds the KV cache capacity") as err:
        plan_capacity(SMOLLM2, CapacityRequest(max_total_tokens=4096, max_batch_total_tokens=2048), None)
    assert err.value.field == "max_total_tokens"
    with pytest.raises(CapacityError, match="cannot hold one block") as err:
        plan_capacity(SMOLLM2, CapacityRequest(), kv_budget=100_000)
    assert err.value.field == "max_batch_total_tokens"


def test_the_default_kv_budget_is_a_share_of_the_headroom():
    assert kv_budget_bytes(10 * GIB) == int(10 * GIB * KV_HEADROOM_SHARE)
    assert kv_budget_bytes(None) is None
