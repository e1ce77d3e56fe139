"""A GGUF file as the folder everything above the model loader reads: ``config.json``, float32
``model.safetensors``, tokenizer files (chat template included), ``gguf_source.json`` naming the file.

Llama-family files (:data:`~tgi_nb.models.quant_gguf.GGUF_ARCHITECTURES`) are converted tensor by tensor: each
is dequantized (gguf's dequantizer, llama's q/k rows un-permuted, as transformers' GGUF loader does) and written
straight into the safetensors file, so a 1.7B Q4_K_M file takes one tensor's memory to convert instead of its
whole float32 model twice over. Other architectures go through transformers' own loader. The engine then reads
the file's quantized blocks as stored and the folder's float tensors for the rest
(:meth:`tgi_nb.models.llama.LlamaModel.load`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Callable

logger = logging.getLogger("tgi_nb")

GGUF_SOURCE_FILE = "gguf_source.json"


def file_sha256(path: Path) -> str:
    """The file's SHA-256, computed once per process for each (path, size, modification time): what
    ``gguf_source.json`` records, so that a converted folder finds its file by content, not by path."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class UnsupportedArchitecture(ValueError):
    """A GGUF file of an architecture neither tgi_nb's forward nor transformers' GGUF loader takes; the message
    names it and what is supported."""

    def __init__(self, gguf_file: Path, architecture: str):
        self.architecture = architecture
        ours, theirs = supported_architectures()
        super().__init__(
            f"{gguf_file.name}: GGUF architecture {architecture!r} is not supported. tgi_nb runs {', '.join(ours)} "
            f"on its own forward with the GGUF blocks kept as stored, and {', '.join(theirs)} through transformers "
            f"with the weights dequantized to float32; llama.cpp's llama-server runs more (tgi_nb.connect() to one)")


def supported_architectures() -> tuple[list[str], list[str]]:
    """The GGUF architectures tgi_nb loads: on its own forward (blocks kept), and through transformers' GGUF loader
    (dequantized). Mistral's files say ``llama``.

    Example:
        >>> ours, theirs = supported_architectures()
        >>> ours, "phi3" in theirs
        (['llama', 'qwen2', 'qwen3'], True)
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .quant_gguf import GGUF_ARCHITECTURES

    theirs = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES
                    if a not in ("general", "tokenizer", "mistral") and a not in GGUF_ARCHITECTURES)
    return list(GGUF_ARCHITECTURES), theirs


def _check_architecture(gguf_file: Path, arch: str) -> None:
    ours, theirs = supported_architectures()
    # transformers' own renames of llama.cpp's names (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, t5encoder -> t5)
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe"), arch.replace("encoder", "")}
    if not names & set(ours + theirs):
        raise UnsupportedArchitecture(gguf_file, arch)


def write_converted(gguf_file: Path, out: Path, announce: Callable[[str], None]) -> None:
    """Write ``gguf_file``'s folder into ``out`` (an empty folder); ``announce`` reports the stages."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .quant_gguf import GGUF_ARCHITECTURES, read_gguf_tensor_table

    folder, name = str(gguf_file.parent), gguf_file.name
    arch, _ = read_gguf_tensor_table(gguf_file)
    _check_architecture(gguf_file, arch)
    announce("  [1/3] reading the tokenizer and chat template")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        logger.warning("%s carries no chat template; chat requests will need one (EngineConfig.chat_template)",
                       name)
    announce("  [2/3] dequantizing the weights to float32")
    if arch in GGUF_ARCHITECTURES:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        _write_streamed(gguf_file, config, out / "model.safetensors")
        generation_config = GenerationConfig.from_model_config(config)
    else:
        config, generation_config = _write_with_transformers(gguf_file, out)

    announce("  [3/3] writing the config and tokenizer files")
    # to_json_string rather than to_dict: it turns dtypes and nested configs into JSON values.
    config_dict = json.loads(config.to_json_string(use_diff=False))
    # The weights are plain float32 now; a quantization_config would make loaders look for GGUF.
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF metadata "general.name", not a path
    config_dict.pop("_name_or_path", None)  # the folder the GGUF file happened to be in
    config_dict["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (out / GGUF_SOURCE_FILE).write_text(json.dumps({"file": str(gguf_file), "size": gguf_file.stat().st_size,
                                                    "sha256": file_sha256(gguf_file)}) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    # GGUF leaves the tokenizer unbounded; the model's context is the true limit.
    tokenizer.model_max_length = config_dict.get("max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(str(out))
    _drop_keys(out / "tokenizer_config.json", ("is_local", "local_files_only"))  # load-time flags, not config
    # mkdtemp makes the folder private; the cache is as readable as any other file the user writes.
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)
    for f in out.iterdir():
        f.chmod(0o666 & ~umask)


def _write_streamed(gguf_file: Path, config, path: Path) -> None:
    """The float32 safetensors file of a Llama-family GGUF file, one tensor at a time: the header first (every
    name, shape and offset is known from the GGUF tensor table), then each tensor's bytes as it is dequantized."""
    from .quant_gguf import iter_gguf_dense

    heads = config.num_attention_heads
    tensors = [t for t in iter_gguf_dense(gguf_file, heads, getattr(config, "num_key_value_heads", None) or heads)
               if not (config.tie_word_embeddings and t[0] == "lm_head.weight")]
    stream_safetensors(path, tensors, {"format": "pt", "source": f"gguf:{gguf_file.name}"})


def stream_safetensors(path: Path, tensors, metadata: dict[str, str], dtype=None) -> None:
    """Write a safetensors file from ``(name, shape, read)`` triples, ``read()`` giving the tensor in ``dtype``
    (default float32): the header first, then each tensor's bytes as it is made, so only one is in memory at a
    time.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> stream_safetensors(path, [("a", (2, 3), lambda: torch.ones(2, 3))], {"format": "pt"})
        >>> load_file(path)["a"].sum().item()
        6.0
    """
    import torch

    dtype = dtype or torch.float32
    code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    header, start = {"__metadata__": metadata}, 0
    for name, shape, _ in tensors:
        size = dtype.itemsize * _prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)         # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, read in tensors:
            tensor = read().contiguous()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {shape}")
            f.write(tensor.view(-1).view(torch.uint8).numpy().tobytes())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_with_transformers(gguf_file: Path, out: Path):
    """Dequantize with transformers' GGUF loader (the whole model in memory) and save its state."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # Tied tensors share storage, which safetensors refuses; loaders re-tie from the config.
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": f"gguf:{gguf_file.name}"})
    return model.config, model.generation_config


def _drop_keys(json_file: Path, keys: tuple[str, ...]) -> None:
    if json_file.is_file():
        data = json.loads(json_file.read_text())
        for key in keys:
            data.pop(key, None)
        json_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
