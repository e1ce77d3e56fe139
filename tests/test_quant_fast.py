"""The "fast" numerics of the quantized kernels (llama.cpp's: int8 activations, integer dot products per block) on
every variant this CPU runs and every type, against a Python emulation: activations quantized as llama.cpp does
(Q8_0 per 32 for the 32-weight types by gguf's quantizer, bit for bit; Q8_K per 256 for the K-quants, as
quantize_row_q8_K), per (sub-)block integer dot products in int64, scaled and summed in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tgi_nb.models import quant
from tgi_nb.models.quant import BLOCK, BLOCK_BYTES, QuantizedTensor, quantized_linear

QTYPES = list(quant.QTYPE_IDS)
K_QTYPES = [q for q in QTYPES if quant.BLOCK_WEIGHTS[q] == 256]
VARIANTS = quant.runnable_variants()


def fast(x, w, *args, **kwargs):
    return quantized_linear(x, w, *args, numerics="fast", **kwargs)


def halves(t: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 fp16 bytes -> [...] float64."""
    return t.contiguous().view(torch.float16)[..., 0].double()


def weight_fields(w: QuantizedTensor):
    """32-weight types, per row and block: d, m (Q4_1 / Q5_1; else None) in float64 and the 32 quants as int64
    (Q4 / Q5: unsigned, the fifth bit in)."""
    n, k = w.shape
    blocks = w.to_layout("ggml").data.view(n, k // BLOCK, BLOCK_BYTES[w.qtype])
    if w.qtype == "q8_0":
        return halves(blocks[..., :2]), None, blocks[..., 2:].contiguous().view(torch.int8).long()
    has_min, q5 = w.qtype in ("q4_1", "q5_1"), w.qtype in ("q5_0", "q5_1")
    qs = blocks[..., BLOCK_BYTES[w.qtype] - 16:].long()
    q = torch.cat([qs & 15, qs >> 4], dim=-1)
    if q5:
        at = 4 if has_min else 2
        qh = blocks[..., at:at + 4].contiguous().view(torch.int32).long()
        q = q | ((qh >> torch.arange(32)) & 1) << 4
    return halves(blocks[..., :2]), halves(blocks[..., 2:4]) if has_min else None, q


def k_fields(w: QuantizedTensor):
    """K-quants, per row and superblock: d, dmin (Q6_K: None) float64; the sub-blocks' scales and mins (Q6_K:
    None) int64; the quants [.., sub-blocks, 32 or 16] int64, unsigned (Q6_K: 0..63, its offset 32 not taken)."""
    n, k = w.shape
    b = w.to_layout("ggml").data.view(n, k // 256, BLOCK_BYTES[w.qtype]).numpy()
    if w.qtype == "q6_k":
        ql, qh = b[..., :128].astype(np.int64), b[..., 128:192].astype(np.int64)
        q = np.empty((n, k // 256, 2, 4, 32), dtype=np.int64)
        for h in range(2):
            for j in range(4):
                low = (ql[..., 64 * h + 32 * (j & 1):64 * h + 32 * (j & 1) + 32] >> (4 * (j >> 1))) & 15
                q[:, :, h, j] = low | ((qh[..., 32 * h:32 * h + 32] >> (2 * j)) & 3) << 4
        sc = b[..., 192:208].view(np.int8).astype(np.int64)
        d = b[..., 208:210].copy().view(np.float16).astype(np.float64)[..., 0]
        return torch.from_numpy(d), None, torch.from_numpy(sc), None, torch.from_numpy(q.reshape(n, k // 256, 16, 16))
    d = b[..., 0:2].copy().view(np.float16).astype(np.float64)[..., 0]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]
    sc, mn = quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).copy())
    qs = b[..., -128:].astype(np.int64).reshape(n, k // 256, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k // 256, 8, 32)
    if w.qtype == "q5_k":
        qh = b[..., 16:48].astype(np.int64)
        q = q | ((qh[:, :, None, :] >> np.arange(8)[:, None]) & 1) << 4
    shape = (n, k // 256, 8)
    return (torch.from_numpy(d), torch.from_numpy(dmin), torch.from_numpy(sc.reshape(shape).astype(np.int64)),
            torch.from_numpy(mn.reshape(shape).astype(np.int64)), torch.from_numpy(q))


def quantize_activations(x: torch.Tensor):
    """gguf's Q8_0 of each row: d [M, K/32] float64 (an fp16 value), q [M, K/32, 32] int64."""
    m, k = x.shape
    blocks = torch.from_numpy(quants.quantize(x.float().numpy(), GGMLQuantizationType.Q8_0)).view(m, k // BLOCK, 34)
    return halves(blocks[..., :2]), blocks[..., 2:].contiguous().view(torch.int8).long()


def quantize_activations_k(x: torch.Tensor):
    """llama.cpp's quantize_row_q8_K of each row in float32: d [M, K/256] (as float32 values), q [M, K/256, 256]
    int64. The first element of largest magnitude maps to -127, ties round to even."""
    xb = x.float().numpy().reshape(x.shape[0], -1, 256)
    first = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)          # the signed max
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-127) / first
        q = np.minimum(127, np.rint(iscale * xb))
        d = np.float32(1) / iscale
    zero = first == 0
    q, d = np.where(zero, 0, q), np.where(zero, 0, d)[..., 0]
    return torch.from_numpy(d.astype(np.float32)).double(), torch.from_numpy(q.astype(np.int64))


def emulate(x, w, bias=None, residual=None, silu_mul=False) -> torch.Tensor:
    """The fast numerics in int64 / float64."""
    y = (_emulate_k if w.qtype in K_QTYPES else _emulate_32)(x, w)
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    if silu_mul:
        half = y.shape[1] // 2
        y = torch.nn.functional.silu(y[:, :half]) * y[:, half:]
    return y


def _emulate_32(x, w):
    dw, mw, qw = weight_fields(w)
    dx, qx = quantize_activations(x)
    dots = torch.einsum("mbk,nbk->mnb", qx, qw)                  # exact integer dot products per block
    scale = dx[:, None, :] * dw[None]
    offset = {"q4_0": 8, "q5_0": 16}.get(w.qtype, 0)
    terms = scale * (dots - offset * qx.sum(-1)[:, None, :]).double()
    if mw is not None:
        terms = terms + mw[None] * (dx * qx.sum(-1).double())[:, None, :]   # llama.cpp's q8_1 s = d_x sum q_x
    return terms.sum(-1)


def _emulate_k(x, w):
    d, dmin, sc, mn, qw = k_fields(w)
    dx, qx = quantize_activations_k(x)
    sub = qw.shape[-1]
    qx = qx.view(x.shape[0], -1, 256 // sub, sub)
    dots = torch.einsum("mbjk,nbjk->mnbj", qx, qw)
    sums = qx.sum(-1)                                             # [M, superblocks, sub-blocks]
    if w.qtype == "q6_k":
        sumi = (sc[None] * (dots - 32 * sums[:, None])).sum(-1)
        return (dx[:, None] * d[None] * sumi.double()).sum(-1)
    sumi = (sc[None] * dots).sum(-1)
    summ = (mn[None] * sums[:, None]).sum(-1)
    return (dx[:, None] * (d[None] * sumi.double() - dmin[None] * summ.double())).sum(-1)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    torch.testing.assert_close(out.double(), ref, rtol=rel, atol=rel * float(ref.abs().max()))


def random_weight(g, n, k, qtype, layout="rows16") -> QuantizedTensor:
    return QuantizedTensor.quantize(torch.randn(n, k, generator=g) / k ** 0.5, qtype).to_layout(layout)


def cols(qtype: str, k: int) -> int:
    """k for the 32-weight types, the whole superblocks nearest it (at least one) for the K-quants."""
    return k if qtype not in K_QTYPES else max(256, k // 256 * 256)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("out_features", [16, 67])
@pytest.mark.parametrize("in_features", [32, 1536])
def test_fast_matches_the_emulation(quant_variant, qtype, out_features, in_features):
    in_features = cols(qtype, in_features)
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


def test_k_activations_are_quantized_as_llama_cpp_bit_for_bit(quant_variant):
    """A Q6_K identity weight (d = 1, scales 1, q - 32 = 1 on the diagonal, 0 elsewhere) returns d_x * q_x, each
    exact in float32: the kernel's Q8_K activation quants and scales are llama.cpp's, including ties (rounded to
    even), the first of two largest magnitudes, a value clamped to 127 and superblocks of zeros."""
    k = 512
    q = np.full((k, k), 32, dtype=np.int64)
    q[np.arange(k), np.arange(k)] = 33
    w = QuantizedTensor(torch.from_numpy(pack_q6_k(q, np.ones((k, k // 16), np.int8), np.ones((k, k // 256)))),
                        "q6_k", (k, k)).to_layout("rows16")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, k, generator=g) * 10.0 ** torch.empty(4, 1).uniform_(-6, 3, generator=g)
    x[0, :8] = torch.tensor([-127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.0])    # iscale = 1: exact ties
    x[1, 256:] = 0
    x[2, :2] = torch.tensor([3.0, -3.0])                                          # the first one is the max
    dx, qx = quantize_activations_k(x)
    assert qx[0, 0, :8].tolist() == [-127, 0, 2, 2, 0, -2, 126, 127]
    expected = (dx.float()[..., None] * qx.float()).view(4, k)
    assert torch.equal(fast(x, w), expected)


def pack_q6_k(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks (GGML's bytes) of quants q [rows, cols] (0..63), int8 scales [rows, cols / 16], d [rows, cols /
    256]."""
    rows, cols = q.shape
    n = rows * cols // 256
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4],
                        axis=-1).reshape(n, 128)
    qh = (q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6).reshape(n, 64)
    halves_ = d.reshape(n, 1).astype(np.float16).view(np.uint8)
    return np.concatenate([ql, qh, scales.reshape(n, 16).view(np.uint8), halves_], axis=1).reshape(rows, -1)


@pytest.mark.parametrize("qtype", QTYPES)
def test_extreme_quants_do_not_saturate(quant_variant, qtype):
    """maddubs sums pairs of u8 x s8 products into saturating int16: Q8_0 weights of -128..127 (gguf never writes
    -128, a file may), every quant bit set (Q4 nibbles of 15, Q5 of 31, Q6_K of 63, largest scales) and random
    bytes, against activations of +-127, give the exact integer dot products."""
    k, n = (512, 32) if qtype in K_QTYPES else (64, 32)
    g = torch.Generator().manual_seed(12)
    bb, bw = BLOCK_BYTES[qtype], quant.BLOCK_WEIGHTS[qtype]
    data = torch.randint(0, 256, (n, k // bw, bb), generator=g, dtype=torch.uint8)
    half_at = {"q6_k": (208,), "q4_k": (0, 2), "q5_k": (0, 2)}.get(qtype, (0,) if qtype in ("q4_0", "q5_0", "q8_0")
                                                                   else (0, 2))
    for at, value in zip(half_at, (0.5, -0.25)):
        data[..., at:at + 2] = torch.tensor([value / (64 if bw == 256 else 1)], dtype=torch.float16).view(torch.uint8)
    if qtype == "q8_0":
        q = data[..., 2:].view(torch.int8)
        q[0], q[1], q[2, :, ::2], q[2, :, 1::2] = -128, 127, -128, 127
    else:
        if qtype == "q6_k":                                  # every quant bit of four rows, largest scales
            data[:4, :, :192], data[:4, :, 192:208] = 0xFF, 0x7F
        else:                                                # every quant (and scale) bit of four rows
            data[:4, :, 4 if bw == 256 else half_at[-1] + 2:] = 0xFF
    w = QuantizedTensor(data.view(n, -1).contiguous(), qtype, (n, k)).to_layout("rows16")
    signs = torch.ones(6, k)
    signs[1] = -1
    signs[2, ::2] = -1
    signs[3] = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    signs[4, 1::2] = -1
    x = signs * 2.0 ** -3            # every activation quantizes to +-127
    qx = quantize_activations_k(x)[1] if qtype in K_QTYPES else quantize_activations(x)[1]
    assert qx.abs().min() == 127
    assert_matches(fast(x, w), emulate(x, w), rel=1e-6)


@pytest.mark.parametrize("qtype", QTYPES)
def test_fast_fusions_match_the_emulation(quant_variant, qtype):
    g = torch.Generator().manual_seed(13)
    k = cols(qtype, 576)
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
    w = random_weight(g, 96, cols(qtype, 576), qtype)
    x = torch.randn(100, cols(qtype, 576), generator=g)
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
    for qtype in QTYPES:
        x = torch.randn(11, cols(qtype, 576), generator=g)
        w = random_weight(g, 67, cols(qtype, 576), qtype)
        outs = [fast(x, w, variant=v) for v in fma]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), qtype


@pytest.mark.parametrize("qtype", QTYPES)
def test_fast_stays_close_to_exact(quant_variant, qtype):
    g = torch.Generator().manual_seed(16)
    w = random_weight(g, 256, cols(qtype, 576), qtype)
    x = torch.randn(8, cols(qtype, 576), generator=g)
    exact, quick = quantized_linear(x, w), fast(x, w)
    err = float((quick - exact).norm() / exact.norm())
    assert 0 < err < 0.02, err


def test_numerics_is_validated():
    w = QuantizedTensor.quantize(torch.randn(16, 32), "q4_0")
    with pytest.raises(ValueError, match="numerics: must be one of exact, fast, got 'int8'"):
        quantized_linear(torch.randn(1, 32), w, numerics="int8")
