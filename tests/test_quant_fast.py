"""The "fast" numerics of the quantized kernels (llama.cpp's: int8 activations, integer dot products per block) on
every variant this CPU runs, against a Python emulation: activations quantized by gguf's Q8_0 quantizer (llama.cpp's
quantize_row_q8_0, bit for bit), per block integer dot products in int64, scaled and summed in float64."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tgi_nb.models import quant
from tgi_nb.models.quant import BLOCK, BLOCK_BYTES, QuantizedTensor, quantized_linear

QTYPES = list(quant.QTYPE_IDS)
VARIANTS = quant.runnable_variants()




def fast(x, w, *args, **kwargs):
    return quantized_linear(x, w, *args, numerics="fast", **kwargs)


def halves(t: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 fp16 bytes -> [...] float64."""
    return t.contiguous().view(torch.float16)[..., 0].double()


def weight_fields(w: QuantizedTensor):
    """Per row and block: d, m (Q4_1; else None) in float64 and the 32 quants as int64 (Q4: the unsigned nibble)."""
    n, k = w.shape
    blocks = w.to_layout("ggml").data.view(n, k // BLOCK, BLOCK_BYTES[w.qtype])
    if w.qtype == "q8_0":
        return halves(blocks[..., :2]), None, blocks[..., 2:].contiguous().view(torch.int8).long()
    qs = blocks[..., 4 if w.qtype == "q4_1" else 2:].long()
    return halves(blocks[..., :2]), halves(blocks[..., 2:4]) if w.qtype == "q4_1" else None, \
        torch.cat([qs & 15, qs >> 4], dim=-1)


def quantize_activations(x: torch.Tensor):
    """gguf's Q8_0 of each row: d [M, K/32] float64 (an fp16 value), q [M, K/32, 32] int64."""
    m, k = x.shape
    blocks = torch.from_numpy(quants.quantize(x.float().numpy(), GGMLQuantizationType.Q8_0)).view(m, k // BLOCK, 34)
    return halves(blocks[..., :2]), blocks[..., 2:].contiguous().view(torch.int8).long()


def emulate(x, w, bias=None, residual=None, silu_mul=False) -> torch.Tensor:
    """The fast numerics in int64 / float64."""
    dw, mw, qw = weight_fields(w)
    dx, qx = quantize_activations(x)
    dots = torch.einsum("mbk,nbk->mnb", qx, qw)                  # exact integer dot products per block
    scale = dx[:, None, :] * dw[None]
    if w.qtype == "q4_0":
        terms = scale * (dots - 8 * qx.sum(-1)[:, None, :]).double()
    elif w.qtype == "q4_1":
        sx = dx * qx.sum(-1).double()          # llama.cpp's q8_1 s: the quantized activations' block sum
        terms = scale * dots.double() + mw[None] * sx[:, None, :]
    else:
        terms = scale * dots.double()
    y = terms.sum(-1)
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    if silu_mul:
        half = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :half]) * y[:, half:]
    return y


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    torch.testing.assert_close(out.double(), ref, rtol=rel, atol=rel * float(ref.abs().max()))


def random_weight(g, n, k, qtype, layout="rows16") -> QuantizedTensor:
    return QuantizedTensor.quantize(torch.randn(n, k, generator=g) / k ** 0.5, qtype).to_layout(layout)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("out_features", [16, 48, 67])
@pytest.mark.parametrize("in_features", [32, 576, 1536])
def test_fast_matches_the_emulation(quant_variant, qtype, out_features, in_features):
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    w = random_weight(g, out_features, in_features, qtype)
    bias = torch.randn(out_features, generator=g)
    for rows in (1, 2, 3, 8, 9, 17, 64, 100):
        x = torch.randn(rows, in_features, generator=g) * 3
        residual = torch.randn(rows, out_features, generator=g)
        assert_matches(fast(x, w, bias, residual), emulate(x, w, bias, residual))
        assert_matches(fast(x, w), emulate(x, w))


def test_activations_are_quantized_as_llama_cpp_bit_for_bit(quant_variant):
    """A Q8_0 identity weight (d = 1, q = 1 on the diagonal) returns d_x * q_x, each exact in float32: the kernel's
    activation quants and scales are gguf's, including ties (x / d = n + 0.5 rounds away from zero), fp16
    subnormal and zero scales, and blocks of zeros."""
    k = 256
    g = torch.Generator().manual_seed(11)
    data = torch.zeros(k, k // BLOCK, 34, dtype=torch.uint8)
    data[..., :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    data[torch.arange(k), torch.arange(k) // BLOCK, 2 + torch.arange(k) % BLOCK] = 1
    w = QuantizedTensor(data.view(k, -1).contiguous(), "q8_0", (k, k)).to_layout("rows16")
    x = torch.randn(5, k, generator=g)
    scales = 10.0 ** torch.empty(5, k // BLOCK).uniform_(-9, 3, generator=g)
    x = (x.view(5, -1, BLOCK) * scales[..., None]).view(5, k)
    x[0, :BLOCK] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5] * 4)   # d = 1: exact ties
    x[1, BLOCK:2 * BLOCK] = 0
    dx, qx = quantize_activations(x)
    assert torch.equal(fast(x, w), (dx[..., None] * qx).view(5, k).float())


@pytest.mark.parametrize("qtype", QTYPES)
def test_extreme_quants_do_not_saturate(quant_variant, qtype):
    """maddubs sums pairs of u8 x s8 products into saturating int16: Q8_0 weights of -128..127 (gguf never writes
    -128, a file may) and Q4 nibbles of 15 against activations of +-127 give the exact integer dot products."""
    k, n = 64, 32
    g = torch.Generator().manual_seed(12)
    bb = BLOCK_BYTES[qtype]
    data = torch.zeros(n, k // BLOCK, bb, dtype=torch.uint8)
    data[..., :2] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
    if qtype == "q8_0":
        q = torch.randint(-128, 128, (n, k // BLOCK, BLOCK), generator=g, dtype=torch.int8)
        q[0], q[1], q[2, :, ::2], q[2, :, 1::2] = -128, 127, -128, 127
        data[..., 2:] = q.view(torch.uint8)
    else:
        if qtype == "q4_1":
            data[..., 2:4] = torch.tensor([-0.25], dtype=torch.float16).view(torch.uint8)
        nibbles = torch.randint(0, 256, (n, k // BLOCK, 16), generator=g, dtype=torch.uint8)
        nibbles[:4] = 0xFF
        data[..., bb - 16:] = nibbles
    w = QuantizedTensor(data.view(n, -1).contiguous(), qtype, (n, k)).to_layout("rows16")
    signs = torch.ones(6, k)
    signs[1] = -1
    signs[2, ::2] = -1
    signs[3] = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    signs[4, 1::2] = -1
    x = signs * 2.0 ** -3            # every activation quantizes to +-127 with d = fp16(x / 127)
    dx, qx = quantize_activations(x)
    assert qx.abs().min() == 127
    assert_matches(fast(x, w), emulate(x, w), rel=1e-6)


@pytest.mark.parametrize("qtype", QTYPES)
def test_fast_fusions_match_the_emulation(quant_variant, qtype):
    g = torch.Generator().manual_seed(13)
    k = 576
    norm = (torch.rand(k, generator=g) + 0.5, 1e-5)
    for intermediate in (48, 35):        # 35: the up half is not on a group, silu_mul runs in torch
        w = random_weight(g, 2 * intermediate, k, qtype)
        for rows in (1, 9, 64, 100):     # 100: two calls with silu_mul (64 rows per call)
            x = torch.randn(rows, k, generator=g) * 3
            xn = normalized(x, norm)
            assert_matches(fast(x, w, norm=norm), emulate(xn, w))
            out = fast(x, w, norm=norm, silu_mul=True)
            assert out.shape == (rows, intermediate)
            assert_matches(out, emulate(xn, w, silu_mul=True))
    ggml = random_weight(g, 96, k, qtype, layout="ggml")      # converted to rows16 on the way
    x = torch.randn(3, k, generator=g)
    assert_matches(fast(x, ggml, silu_mul=True), emulate(x, ggml, silu_mul=True))


def normalized(x: torch.Tensor, norm) -> torch.Tensor:
    """The kernel's own RMSNorm of x (the quants depend on every bit of it): the exact kernel with the norm against
    a Q8_0 identity (d = 1, q = 1), whose products are the normalized values themselves."""
    k = x.shape[1]
    data = torch.zeros(k, k // BLOCK, 34, dtype=torch.uint8)
    data[..., :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    data[torch.arange(k), torch.arange(k) // BLOCK, 2 + torch.arange(k) % BLOCK] = 1
    eye = QuantizedTensor(data.view(k, -1).contiguous(), "q8_0", (k, k)).to_layout("rows16")
    return quantized_linear(x, eye, norm=norm)


@pytest.mark.parametrize("qtype", QTYPES)
def test_fast_rows_do_not_depend_on_the_batch_or_threads(quant_variant, qtype):
    g = torch.Generator().manual_seed(14)
    w = random_weight(g, 96, 576, qtype)
    x = torch.randn(100, 576, generator=g)
    whole = fast(x, w)
    for rows in (1, 2, 3, 7, 8, 9, 13, 33, 64):
        assert torch.equal(fast(x[:rows], w), whole[:rows]), rows
    assert torch.equal(fast(x[37:46], w), whole[37:46])
    gated = fast(x, w, silu_mul=True)
    assert torch.equal(fast(x[70:75], w, silu_mul=True), gated[70:75])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(fast(x, w), whole)
    finally:
        torch.set_num_threads(threads)


def test_fma_variants_agree_bit_for_bit():
    """Every per-block term is exact until its one FMA, so the vector paths (dpbusd, maddubs) agree to the bit."""
    fma = [v for v in VARIANTS if v != "generic" and quant.vector_width(v) is not None]
    if len(fma) < 2:
        pytest.skip("one FMA variant on this CPU")
    g = torch.Generator().manual_seed(15)
    x = torch.randn(11, 576, generator=g)
    for qtype in QTYPES:
        w = random_weight(g, 67, 576, qtype)
        outs = [fast(x, w, variant=v) for v in fma]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), qtype


@pytest.mark.parametrize("qtype", QTYPES)
def test_fast_stays_close_to_exact(quant_variant, qtype):
    g = torch.Generator().manual_seed(16)
    w = random_weight(g, 256, 576, qtype)
    x = torch.randn(8, 576, generator=g)
    exact, quick = quantized_linear(x, w), fast(x, w)
    err = float((quick - exact).norm() / exact.norm())
    assert 0 < err < 0.02, err


def test_numerics_is_validated():
    w = QuantizedTensor.quantize(torch.randn(16, 32), "q4_0")
    with pytest.raises(ValueError, match="numerics: must be one of exact, fast, got 'int8'"):
        quantized_linear(torch.randn(1, 32), w, numerics="int8")
