"""GGUF files: the tensor table read straight from the header, and the quantized tensors of a Llama-family file
as stored (:class:`~tgi_nb.models.quant_formats.QuantizedTensor`), under transformers' names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .quant_formats import BLOCK_BYTES, BLOCK_WEIGHTS, QTYPE_IDS, QuantizedTensor

logger = logging.getLogger("tgi_nb")

# GGUF tensor names of a Llama-family model -> transformers' names (what LlamaModel loads).
_GGUF_MODEL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                     "output_norm.weight": "model.norm.weight"}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# Architectures whose GGUF tensors map onto LlamaModel's; llama.cpp's converter permutes llama's q/k rows.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def hf_tensor_name(gguf_name: str) -> Optional[str]:
    """transformers' name of a Llama-family GGUF tensor (None for one it has no parameter for, e.g. llama 3's
    ``rope_freqs.weight``, which its config carries).

    Example:
        >>> hf_tensor_name("blk.3.ffn_norm.weight"), hf_tensor_name("blk.0.attn_q.bias")
        ('model.layers.3.post_attention_layernorm.weight', 'model.layers.0.self_attn.q_proj.bias')
    """
    if gguf_name in _GGUF_MODEL_NAMES:
        return _GGUF_MODEL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] in ("weight", "bias") and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    # transformers' reverse of convert_hf_to_gguf's permute, applied to row indices: whole rows move, blocks intact.
    idx = torch.arange(rows)
    return idx.reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_tensor_table(gguf_file: str | Path) -> tuple[str, list[tuple[str, int, tuple[int, ...], int]]]:
    """The architecture and tensor table of a GGUF file: ``(name, GGML type id, dims innermost first, absolute
    byte offset)`` per tensor. A lean reader of the header only: gguf's ``GGUFReader`` builds every metadata
    field (a 49k-token vocabulary: tens of seconds on a busy 2-core machine); this skips what it does not need.

    Example:
        >>> from tgi_nb.models.loader import bundled_gguf_path
        >>> arch, table = read_gguf_tensor_table(bundled_gguf_path())     # doctest: +SKIP
        >>> arch, table[0][:3]                                            # doctest: +SKIP
        ('llama', ('token_embd.weight', 8, (576, 49152)))
    """
    import struct

    with open(gguf_file, "rb") as f:
        buf = memoryview(f.read(64 << 20))     # metadata and tensor table; a vocabulary of 250k tokens is ~5 MB
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        length = take("Q")
        pos += length
        return bytes(buf[pos - length:pos]).decode("utf-8", errors="replace")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == _GGUF_STRING:
            length = take("Q")          # not `pos += take(...)`: that adds to pos as it was before the read
            pos += length
        elif vtype == _GGUF_ARRAY:
            item_type, count = take("IQ")
            if item_type in _GGUF_SCALAR_SIZES:
                pos += count * _GGUF_SCALAR_SIZES[item_type]
            else:
                for _ in range(count):
                    skip(item_type)
        elif vtype in _GGUF_SCALAR_SIZES:
            pos += _GGUF_SCALAR_SIZES[vtype]
        else:
            raise ValueError(f"{gguf_file}: unknown GGUF value type {vtype}")

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{gguf_file}: not a GGUF file (magic {bytes(buf[:4])!r})")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version < 2:
        raise ValueError(f"{gguf_file}: GGUF version {version} is not supported (2 or later)")
    arch, alignment = "", 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.architecture" and vtype == _GGUF_STRING:
            arch = string()
        elif key == "general.alignment" and vtype == 4:
            alignment = take("I")
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        qtype, offset = take("IQ")
        infos.append((name, qtype, dims, offset))
    data_start = -(-pos // alignment) * alignment
    return arch, [(name, qtype, dims, data_start + offset) for name, qtype, dims, offset in infos]


def read_gguf_quantized(gguf_file: str | Path, num_heads: int, num_kv_heads: int) -> dict[str, QuantizedTensor]:
    """The quantized linear and embedding tensors of a Llama-family GGUF file whose type is kept as stored
    (:data:`~tgi_nb.models.quant_formats.QTYPE_IDS`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), under
    transformers' names (q/k rows un-permuted as transformers does). Other types (F32 norms, F16, IQ types) are
    left out: the loader takes those from the converted float32 model. An architecture outside
    :data:`GGUF_ARCHITECTURES` gives an empty dict.

    Example:
        >>> from tgi_nb.models.loader import bundled_gguf_path
        >>> q = read_gguf_quantized(bundled_gguf_path(), 9, 3)          # doctest: +SKIP
        >>> q["model.layers.0.mlp.down_proj.weight"].qtype, q["model.embed_tokens.weight"].qtype  # doctest: +SKIP
        ('q4_1', 'q8_0')
    """
    arch, table = read_gguf_tensor_table(gguf_file)
    if arch not in GGUF_ARCHITECTURES:
        logger.info("GGUF architecture %r: weights are dequantized at load", arch)
        return {}
    names = {qid: name for name, qid in QTYPE_IDS.items()}
    file = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    out = {}
    for gguf_name, type_id, dims, offset in table:
        name = hf_tensor_name(gguf_name)
        if name is None or type_id not in names or len(dims) != 2 or name.endswith(".bias"):
            continue
        qtype = names[type_id]
        cols, rows = dims                                    # GGUF lists dimensions innermost first
        row_bytes = cols // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]
        data = torch.from_numpy(np.array(file[offset:offset + rows * row_bytes])).reshape(rows, row_bytes)
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = num_heads if ".attn_q." in gguf_name else num_kv_heads
            data = data[_unpermute_rows(rows, heads)].contiguous()
        out[name] = QuantizedTensor(data, qtype, (rows, cols))
    return out


def iter_gguf_dense(gguf_file: str | Path, num_heads: int, num_kv_heads: int):
    """``(transformers name, shape, read)`` for each tensor of a Llama-family GGUF file (``arch`` in
    :data:`GGUF_ARCHITECTURES`), ``read()`` giving it dequantized to float32 as transformers' GGUF loader does
    (gguf's dequantizer, llama's q/k rows un-permuted): one tensor in memory at a time, for a streaming
    conversion. Tensors without a transformers parameter are left out.

    Example:
        >>> from tgi_nb.models.loader import bundled_gguf_path
        >>> name, shape, read = next(iter_gguf_dense(bundled_gguf_path(), 9, 3))      # doctest: +SKIP
        >>> name, shape, read().dtype                                                  # doctest: +SKIP
        ('model.embed_tokens.weight', (49152, 576), torch.float32)
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    arch, table = read_gguf_tensor_table(gguf_file)
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf_file}: architecture {arch!r} is not one of {', '.join(GGUF_ARCHITECTURES)}")
    file = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    for gguf_name, type_id, dims, offset in table:
        name = hf_tensor_name(gguf_name)
        if name is None:
            logger.info("GGUF tensor %s has no transformers parameter; left out", gguf_name)
            continue
        shape = tuple(reversed(dims))                       # GGUF lists dimensions innermost first
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        row_bytes = shape[-1] // block * size

        def read(offset=offset, shape=shape, row_bytes=row_bytes, type_id=type_id, gguf_name=gguf_name):
            rows = int(np.prod(shape[:-1]))
            raw = np.asarray(file[offset:offset + rows * row_bytes]).reshape(rows, row_bytes)
            dense = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType(type_id)).astype(np.float32))
            dense = dense.reshape(shape)
            if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
                dense = dense[_unpermute_rows(shape[0], num_heads if ".attn_q." in gguf_name else num_kv_heads)]
            return dense.contiguous()

        yield name, shape, read
