"""The decode graph runner's bucketing and padding (the CPU stand-in calls the function on the padded static
buffers that a CUDA graph would replay), eager fallbacks, and, where a GPU is present, replay = eager."""

from __future__ import annotations

import pytest
import torch

from tgi_nb.engine.cuda_graphs import DecodeGraphs, StaticInput, capture_sizes


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert capture_sizes(256)[-3:] == [224, 240, 256]
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


class Recorder:
    """A decode-step stand-in: per row, ids * 10 + lens; remembers what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids, lens, tables):
        self.calls.append({"ids": ids.clone(), "lens": lens.clone(), "tables": tables.clone()})
        return (ids * 10 + lens)[:, None].float() + tables.sum(-1, keepdim=True)


def make(max_batch=16, enforce_eager=False):
    fn = Recorder()
    graphs = DecodeGraphs(fn, {"ids": StaticInput((), torch.int64, pad=0),
                               "lens": StaticInput((), torch.int32, pad=0),
                               "tables": StaticInput((3,), torch.int32, pad=-1)},
                          max_batch=max_batch, device=torch.device("cpu"), enforce_eager=enforce_eager)
    graphs.capture()
    return graphs, fn


def step(n, offset=0):
    return dict(ids=torch.arange(n) + offset, lens=torch.full((n,), 5, dtype=torch.int32),
                tables=torch.ones(n, 3, dtype=torch.int32))


@pytest.mark.parametrize("n,bucket", [(1, 1), (3, 4), (4, 4), (5, 8), (9, 16), (16, 16)])
def test_rows_are_padded_to_the_bucket(n, bucket):
    graphs, fn = make()
    out = graphs.run(**step(n, offset=100))
    assert out.shape == (n, 1)
    assert out[:, 0].tolist() == [(100 + i) * 10 + 5 + 3 for i in range(n)]
    call = fn.calls[-1]
    assert call["ids"].shape[0] == bucket            # the function saw the whole bucket ...
    assert call["ids"][:n].tolist() == list(range(100, 100 + n))
    assert call["ids"][n:].tolist() == [0] * (bucket - n)          # ... its padding rows with the pad values
    assert call["lens"][n:].tolist() == [0] * (bucket - n)
    assert (call["tables"][n:] == -1).all()
    assert graphs.stats.replays == 1 and graphs.stats.padded_rows == bucket - n
    assert graphs.stats.buckets == {bucket: 1}


def test_padding_of_a_larger_step_does_not_leak_into_a_smaller_one():
    graphs, fn = make()
    graphs.run(**step(7, offset=50))
    out = graphs.run(**step(5, offset=1))
    assert fn.calls[-1]["ids"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert out[:, 0].tolist() == [(1 + i) * 10 + 8 for i in range(5)]


def test_beyond_the_largest_bucket_and_enforce_eager_run_unpadded():
    graphs, fn = make(max_batch=16)
    graphs.run(**step(20))
    assert fn.calls[-1]["ids"].shape[0] == 20 and graphs.stats.eager == 1 and graphs.stats.replays == 0
    eager, fn2 = make(enforce_eager=True)
    out = eager.run(**step(3))
    assert fn2.calls[-1]["ids"].shape[0] == 3 and out.shape == (3, 1)
    assert eager.bucket_for(1) is None and eager.stats.eager == 1


def test_inputs_must_match_the_declared_ones():
    graphs, _ = make()
    with pytest.raises(ValueError, match="inputs must be exactly"):
        graphs.run(ids=torch.zeros(2, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replay_equals_eager_on_the_gpu():
    weight = torch.randn(64, 64, device="cuda")

    def fn(x, scale):
        return torch.relu(x @ weight) * scale[:, None]

    graphs = DecodeGraphs(fn, {"x": StaticInput((64,), torch.float32), "scale": StaticInput((), torch.float32)},
                          max_batch=32, device=torch.device("cuda"))
    graphs.capture()
    assert graphs.stats.capture_seconds > 0
    for n in (1, 3, 17, 32):
        x, scale = torch.randn(n, 64, device="cuda"), torch.rand(n, device="cuda")
        torch.testing.assert_close(graphs.run(x=x, scale=scale), fn(x, scale))
    assert graphs.stats.replays == 4
