"""GGUF files of the architectures people download (llama, mistral, qwen2, qwen3, phi3, gemma3, gemma2, and one
tgi_nb does not know), written here with the ``gguf`` package as llama.cpp writes them (metadata, a byte-level
tokenizer, quantized tensors): each loads and gives transformers' greedy tokens on its dequantized conversion, or
is refused with a message naming the architecture."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import TransformersReference, assert_same_greedy
from gguf_fixtures import TINY_VOCAB, write_model_gguf
from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams
from tgi_nb.models import resolve_model
from tgi_nb.models.gguf_convert import UnsupportedArchitecture

H, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def tiny_gguf(path, arch: str, name: str = "tiny", head_dim: int = 16):
    """A 2-layer model of ``arch`` with random weights (std 0.2, norms near 1), linear layers in Q8_0 / Q4_1."""
    g = torch.Generator().manual_seed(len(arch))

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    tensors = {"token_embd.weight": (w(TINY_VOCAB, H), "q8_0"), "output_norm.weight": (norm(H), "f32")}
    hparams = {"context_length": 1024, "embedding_length": H, "feed_forward_length": FF, "block_count": LAYERS,
               "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
               "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors.update({b + "attn_norm.weight": (norm(H), "f32"), b + "ffn_norm.weight": (norm(H), "f32"),
                        b + "attn_output.weight": (w(H, q), "q8_0"), b + "ffn_down.weight": (w(H, FF), "q8_0")})
        if arch == "phi3":        # fused q|k|v and gate|up
            tensors.update({b + "attn_qkv.weight": (w(q + 2 * kv, H), "q8_0"), b + "ffn_up.weight": (w(2 * FF, H), "q4_1")})
        else:
            tensors.update({b + "attn_q.weight": (w(q, H), "q8_0"), b + "attn_k.weight": (w(kv, H), "q8_0"),
                            b + "attn_v.weight": (w(kv, H), "q8_0"), b + "ffn_gate.weight": (w(FF, H), "q4_1"),
                            b + "ffn_up.weight": (w(FF, H), "q4_1")})
        if arch == "qwen2":
            tensors.update({b + f"attn_{n}.bias": (0.1 * w(rows), "f32") for n, rows in (("q", q), ("k", kv), ("v", kv))})
        if arch in ("qwen3", "gemma3"):
            tensors.update({b + "attn_q_norm.weight": (norm(head_dim), "f32"),
                            b + "attn_k_norm.weight": (norm(head_dim), "f32")})
        if arch in ("gemma2", "gemma3"):
            tensors.update({b + "post_attention_norm.weight": (norm(H), "f32"),
                            b + "post_ffw_norm.weight": (norm(H), "f32")})
    if arch in ("llama", "phi3"):
        hparams["rope.dimension_count"] = head_dim
    if arch in ("gemma2", "gemma3"):
        hparams.update({"attention.key_length": head_dim, "attention.value_length": head_dim,
                        "attention.sliding_window": 8})
    if arch in ("qwen2", "phi3"):
        tensors["output.weight"] = (w(TINY_VOCAB, H), "q8_0")
    return write_model_gguf(path, arch, hparams, tensors, name=name)


# (architecture in the file, general.name, head_dim, the class tgi_nb runs it with, what the weights become)
LOADED = [("llama", "tiny-mistral", 16, "LlamaModel", "q8_0"),       # mistral's files say llama, and run as one
          ("qwen2", "tiny", 16, "LlamaModel", "q4_1"),
          ("qwen3", "tiny", 128, "LlamaModel", "q4_1"),              # transformers' Qwen3 head_dim: 128
          ("phi3", "tiny", 16, "TransformersModel", None),
          ("gemma3", "tiny", 16, "TransformersModel", None)]


@pytest.mark.parametrize("arch,name,head_dim,runner,kept", LOADED)
def test_architectures_load_with_transformers_greedy_tokens(tmp_path, arch, name, head_dim, runner, kept):
    path = tiny_gguf(tmp_path / f"{arch}.gguf", arch, name, head_dim)
    with LLMEngine(EngineConfig(model_id=str(path))) as engine:
        assert type(engine.model).__name__ == runner
        if kept:                         # GGUF blocks as stored (exact numerics: the dequantized model's numbers)
            assert kept in engine.model.weight_formats()
        ref = TransformersReference(engine.model_dir, torch.float32)
        ids = engine.tokenize("The tiny models of many kinds")
        ours = engine.generate_sync(ids, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
        tokens, margins, _ = ref.greedy(ids, 10)
        assert_same_greedy(ours.outputs[0].token_ids, tokens, margins, clear_margin=1e-3, label=arch)


@pytest.mark.parametrize("arch,head_dim", [("llama", 16), ("qwen2", 16), ("qwen3", 128)])
def test_llama_family_files_convert_tensor_by_tensor_as_transformers_does(tmp_path, arch, head_dim):
    """The streamed conversion (one tensor in memory at a time; llama's q/k rows un-permuted, qwen2's biases,
    qwen3's q/k norms) writes what transformers' GGUF loader loads, bit for bit."""
    from safetensors.torch import load_file

    from tgi_nb.models.gguf_convert import _write_streamed, _write_with_transformers

    path = tiny_gguf(tmp_path / f"{arch}.gguf", arch, head_dim=head_dim)
    (tmp_path / "reference").mkdir()
    config, _ = _write_with_transformers(path, tmp_path / "reference")
    _write_streamed(path, config, tmp_path / "streamed.safetensors")
    streamed, reference = load_file(tmp_path / "streamed.safetensors"), load_file(tmp_path / "reference" /
                                                                                  "model.safetensors")
    assert sorted(streamed) == sorted(reference)
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)


def test_gemma2_is_refused_at_load_naming_what_it_lacks(tmp_path):
    path = tiny_gguf(tmp_path / "gemma2.gguf", "gemma2")
    with pytest.raises(ValueError, match=r"gemma2: attention logit soft-capping \(attn_logit_softcapping=50.0\) is "
                                         r"not supported by tgi_nb's paged attention"):
        LLMEngine(EngineConfig(model_id=str(path)))


def test_an_unknown_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path):
    path = tiny_gguf(tmp_path / "cmdr.gguf", "command-r")
    with pytest.raises(UnsupportedArchitecture, match=r"cmdr.gguf: GGUF architecture 'command-r' is not supported. "
                                                      r"tgi_nb runs llama, qwen2, qwen3 on its own forward with the "
                                                      r"GGUF blocks kept as stored, and .*gemma3.*phi3.* through "
                                                      r"transformers with the weights dequantized to float32"):
        resolve_model(str(path))
