"""GGUF files written in the tests with the ``gguf`` package (no downloads): tensors quantized to any type tgi_nb
keeps as stored, and a tiny model's GGUF file with the folder it converts to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from tgi_nb.models.loader import GGUF_SOURCE_FILE
from tgi_nb.models.quant import QuantizedTensor, read_gguf_quantized

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# llama.cpp's Q4_K_M: Q4_K, with attn_v and ffn_down (the first and last layers', every third otherwise) and the
# output in Q6_K; a tiny model gets Q6_K v, down and embedding throughout.
Q4_K_M = {"embed": "q6_k", "q_proj": "q4_k", "k_proj": "q4_k", "v_proj": "q6_k", "o_proj": "q4_k",
          "gate_proj": "q4_k", "up_proj": "q4_k", "down_proj": "q6_k"}


def gguf_dequantize(q: QuantizedTensor) -> torch.Tensor:
    """gguf's own numpy dequantizer: the reference every path must equal bit for bit."""
    return torch.from_numpy(quants.dequantize(q.to_layout("ggml").data.numpy(), GGMLQuantizationType[q.qtype.upper()]))


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, tensors: dict[str, tuple[torch.Tensor, str]],
               metadata: dict | None = None) -> dict[str, QuantizedTensor]:
    """A GGUF file with the given float tensors stored as ``qtype`` ("f32" or a quantized type); returns the
    blocks written. ``metadata``: extra key-value fields (``{"qwen2.block_count": 2}``)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, value, _value_type(value))
    return _write_tensors(writer, tensors)


def _write_tensors(writer: GGUFWriter, tensors: dict[str, tuple[torch.Tensor, str]]) -> dict[str, QuantizedTensor]:
    """Add the tensors (quantized to their type, or f32), write the file and close it; the blocks written."""
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


def _value_type(value):
    from gguf import GGUFValueType

    return {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32,
            str: GGUFValueType.STRING}[type(value)]


def gguf_model(src: Path, out: Path, types: dict[str, str]) -> Path:
    """A tiny llama folder ``src`` (tiny_model_dir) written as ``out / "tiny.gguf"`` with ``types`` per weight
    role (``"embed"``, ``"q_proj"``, ...; q/k permuted as llama.cpp writes them), and the folder that file
    converts to (its dequantized weights, naming the file as its source): the loader then reads the blocks as
    stored. Returns the folder."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = load_file(src / "model.safetensors")
    tensors = {"token_embd.weight": (state["model.embed_tokens.weight"], types["embed"])}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in GGUF_NAMES.items():
            part = "self_attn" if hf[0] in "qkvo" else "mlp"
            w = state[f"model.layers.{i}.{part}.{hf}.weight"]
            w = llama_permute(w, heads) if hf == "q_proj" else llama_permute(w, kv_heads) if hf == "k_proj" else w
            tensors[f"blk.{i}.{gg}.weight"] = (w, types[hf])
    out.mkdir(parents=True, exist_ok=True)
    write_gguf(out / "tiny.gguf", "llama", tensors)
    folder = out / "converted"
    shutil.copytree(src, folder)
    blocks = read_gguf_quantized(out / "tiny.gguf", heads, kv_heads)
    save_file({k: blocks[k].dequantize() if k in blocks else v for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / GGUF_SOURCE_FILE).write_text(json.dumps({"file": str(out / "tiny.gguf"),
                                                       "size": (out / "tiny.gguf").stat().st_size}))
    return folder


def source_file(folder: Path) -> str:
    """The GGUF file a gguf_model folder came from."""
    return json.loads((folder / GGUF_SOURCE_FILE).read_text())["file"]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one token per byte, so any text tokenizes without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# The byte alphabet, one merge (" t": a merge list must not be empty), and the chat specials.
TINY_TOKENS = [*_byte_tokens(), "\u0120t", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = len(TINY_TOKENS)


def write_model_gguf(path, arch: str, hparams: dict, tensors: dict[str, tuple[torch.Tensor, str]],
                     name: str = "tiny") -> Path:
    """A complete tiny model GGUF as llama.cpp writes one: ``{arch}.{key}`` metadata from ``hparams``, a byte-level
    BPE tokenizer of 260 tokens (<|im_end|> ends a turn), and ``tensors`` (GGUF names -> (float tensor, type)).
    transformers' GGUF loader (and so tgi_nb's conversion) reads it like a real file."""
    metadata = {"general.name": name, f"{arch}.vocab_size": TINY_VOCAB,
                **{f"{arch}.{k}": v for k, v in hparams.items()},
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.bos_token_id": TINY_TOKENS.index("<|im_start|>"),
                "tokenizer.ggml.eos_token_id": TINY_TOKENS.index("<|im_end|>"),
                "tokenizer.ggml.padding_token_id": TINY_TOKENS.index("<|endoftext|>"),
                "tokenizer.ggml.unknown_token_id": TINY_TOKENS.index("<|endoftext|>")}
    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        writer.add_key_value(key, value, _value_type(value))
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([1] * 257 + [3] * 3)
    writer.add_token_merges(["\u0120 t"])
    _write_tensors(writer, tensors)
    return path


def tiny_q4_k_m_gguf(path) -> Path:
    """A complete tiny llama GGUF (hidden 256: whole K-quant superblocks) in llama.cpp's Q4_K_M mix: Q4_K q, k, o,
    gate, up; Q6_K v, down and the tied embedding; the tiny byte-level tokenizer."""
    g = torch.Generator().manual_seed(256)
    h, ff, heads, kv, head_dim = 256, 512, 8, 4, 32

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    tensors = {"token_embd.weight": (w(TINY_VOCAB, h), "q6_k"), "output_norm.weight": (torch.ones(h), "f32")}
    for i in range(2):
        b = f"blk.{i}."
        tensors.update({b + "attn_norm.weight": (torch.ones(h), "f32"), b + "ffn_norm.weight": (torch.ones(h), "f32"),
                        b + "attn_q.weight": (w(heads * head_dim, h), "q4_k"),
                        b + "attn_k.weight": (w(kv * head_dim, h), "q4_k"),
                        b + "attn_v.weight": (w(kv * head_dim, h), "q6_k"),
                        b + "attn_output.weight": (w(h, heads * head_dim), "q4_k"),
                        b + "ffn_gate.weight": (w(ff, h), "q4_k"), b + "ffn_up.weight": (w(ff, h), "q4_k"),
                        b + "ffn_down.weight": (w(h, ff), "q6_k")})
    hparams = {"context_length": 1024, "embedding_length": h, "feed_forward_length": ff, "block_count": 2,
               "attention.head_count": heads, "attention.head_count_kv": kv, "rope.dimension_count": head_dim,
               "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}
    return write_model_gguf(path, "llama", hparams, tensors)
