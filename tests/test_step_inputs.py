"""The GPU path's step inputs (tgi_nb.engine.step_inputs): one staging buffer, fields of three dtypes, growth; and
a scheduled step packed as the CPU model runner packs it, attended through the Triton kernel to the same result
as the CPU path's attention."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tgi_nb.engine.model_runner import ModelRunner
from tgi_nb.engine.sampling_params import SamplingParams
from tgi_nb.engine.scheduler import SchedulerOutput
from tgi_nb.engine.sequence import Request, Sequence
from tgi_nb.engine.step_inputs import HostBuffer, StepPacker


def test_fields_keep_their_values_when_the_buffer_grows():
    buf = HostBuffer(torch.device("cpu"), capacity=4)
    a = buf.add([1, 2, 3], torch.int32)
    b = buf.add([2**40 + 5, -7], torch.int64)          # aligned on 8 bytes after 3 int32 words
    c = buf.add([0.25] * 100, torch.float32)            # grows the buffer past its 4 words
    views = buf.to_device()
    assert b.offset % 2 == 0
    assert views[a].tolist() == [1, 2, 3] and views[b].tolist() == [2**40 + 5, -7]
    assert views[c].tolist() == [0.25] * 100
    buf.reset()
    d = buf.add([9], torch.int32)
    assert d.offset == 0 and buf.to_device()[d].tolist() == [9]


BLOCK = 4


def make_seq(prompt_len: int, computed: int, blocks: list[int], generated: int = 0) -> Sequence:
    tokens = list(range(10, 10 + prompt_len))
    seq = Sequence(Request("r", tokens, SamplingParams(), lambda _: None, 0.0), 0, list(tokens), None, None)
    for i in range(generated):
        seq.append_token(500 + i)
    seq.block_table = list(blocks)
    seq.num_computed_tokens = computed
    return seq


def mixed_step() -> SchedulerOutput:
    decodes = [make_seq(5, 6, [3, 9], generated=2), make_seq(3, 3, [4], generated=1), make_seq(8, 8, [0, 7, 12],
                                                                                               generated=1)]
    prefills = [(make_seq(11, 0, [1, 2, 5]), 6),          # first chunk: samples nothing
                (make_seq(9, 4, [6, 8, 10]), 5),          # last chunk over a cached prefix
                (make_seq(2, 0, [11]), 2)]
    return SchedulerOutput(decodes=decodes, prefills=prefills)


class CapturingModel:
    """Stands in for the model so that ModelRunner hands over the batch it built (the CPU path's packing)."""

    def __init__(self):
        self.spec = SimpleNamespace(num_layers=1, num_kv_heads=2, head_dim=16)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, input_ids, positions, batch, kv_caches, logits_indices):
        self.seen = (input_ids, positions, batch, logits_indices)
        return torch.zeros(logits_indices.shape[0], 8)


def packed_by_the_cpu_runner(step):
    model = CapturingModel()
    ModelRunner(model, num_blocks=16, block_size=BLOCK).run(step)
    return model.seen


def test_packing_matches_the_cpu_model_runner():
    step = mixed_step()
    input_ids, positions, batch, logits_indices = packed_by_the_cpu_runner(step)
    inputs = StepPacker(torch.device("cpu"), BLOCK, block_table_width=5)
    layout = inputs.build(step.decodes, step.prefills)
    views = inputs.buffer.to_device()
    assert views[layout.input_ids].tolist() == input_ids.tolist()
    assert views[layout.positions].tolist() == positions.tolist()
    assert views[layout.slot_mapping].tolist() == batch.slot_mapping.tolist()
    assert views[layout.logits_indices].tolist() == logits_indices.tolist()
    assert views[layout.seq_lens][:3].tolist() == batch.decode_context_lens.tolist()
    assert views[layout.query_start_loc].tolist() == [0, 1, 2, 3, 9, 14, 16]
    assert layout.num_decodes == 3 and layout.max_query_len == 6 and layout.num_tokens == 16
    tables = views[layout.block_tables]
    assert tables[0].tolist() == [3, 9, 0, 0, 0] and tables[4].tolist() == [6, 8, 10, 0, 0]


def test_a_table_wider_than_the_layout_is_refused():
    with pytest.raises(ValueError, match="block_table_width"):
        StepPacker(torch.device("cpu"), BLOCK, block_table_width=2).build([make_seq(8, 8, [0, 7, 12], 1)], [])


def test_triton_attention_over_the_packed_step_equals_the_cpu_path():
    if not torch.cuda.is_available():   # before triton is imported: its own helpers are jitted at import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from tgi_nb.models.attention import attend
    from tgi_nb.models.triton_attention import paged_attention

    step = mixed_step()
    _, _, batch, _ = packed_by_the_cpu_runner(step)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    k_cache = torch.randn(16, BLOCK, kv_heads, dim, generator=g)
    v_cache = torch.randn(16, BLOCK, kv_heads, dim, generator=g)
    q = torch.randn(16, heads, dim, generator=g)
    k, v = torch.randn(16, kv_heads, dim, generator=g), torch.randn(16, kv_heads, dim, generator=g)
    expected = attend(q, k, v, k_cache, v_cache, batch, dim ** -0.5)   # writes k, v into the caches first

    inputs = StepPacker(torch.device("cpu"), BLOCK, block_table_width=5)
    layout = inputs.build(step.decodes, step.prefills)
    views = inputs.buffer.to_device()
    got = paged_attention(q, k_cache, v_cache, views[layout.block_tables], views[layout.seq_lens],
                          views[layout.query_start_loc], dim ** -0.5, max_query_len=layout.max_query_len)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
