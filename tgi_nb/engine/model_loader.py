"""Loading what the engine runs: the weights on their device and in their dtype, the tokenizer, the tokens that
end a sample, and the CPU threads the kernels use."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tgi_nb.models.interface import CausalLM

from .budget import ThreadChoice, choose_num_threads
from .config import EngineConfig


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of :data:`~tgi_nb.engine.config.DTYPES` (torch's own names; ``EngineConfig``
    checked the name).

    Example:
        >>> from tgi_nb.engine.config import DTYPES
        >>> [torch_dtype(name) for name in DTYPES]
        [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    """
    return getattr(torch, name)


def default_dtype(device: torch.device) -> str:
    """The dtype a model runs in when none is asked for: float32 on the CPU; on CUDA bfloat16 where the GPU
    computes in it (compute capability 8.0 and up), else float16 (a T4 or V100, where torch would emulate
    bfloat16 slowly).

    Example:
        >>> default_dtype(torch.device("cpu"))
        'float32'
    """
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"


def tensor_bytes(obj, _seen: Optional[set] = None, _depth: int = 0) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` through attributes, lists, tuples and dicts (shared
    storage, such as tied embeddings, counted once): what a model's weights take.

    Example:
        >>> w = torch.zeros(4, 8)
        >>> tensor_bytes({"embed": w, "lm_head": w, "norm": torch.zeros(8)})
        160
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device.type)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if _depth > 4:
        return 0
    if isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(t, seen) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(item, seen, _depth + 1) for item in items)


def eos_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """The tokens that end a sample: generation_config.json's ``eos_token_id`` (one or a list) and the
    tokenizer's own."""
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, and what the engine needs to know about it.

    ``source`` says where the weights came from (``hub``, ``local``, ``bundled``...); ``threads`` is the CPU
    thread choice (None on other devices); ``started`` the ``time.perf_counter()`` when loading began.
    """

    model_id: str
    model_dir: Path
    source: str
    tokenizer: Any
    model: CausalLM
    eos_token_ids: set[int]
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    weights_bytes: int
    threads: Optional[ThreadChoice]
    started: float

    def weight_formats(self, numerics: str) -> str:
        """How the weights are held, for the log; for quantized weights, how their products compute."""
        formats = getattr(self.model, "weight_formats", lambda: str(self.dtype))()
        from tgi_nb.models.quant import QTYPE_IDS, kernel_variant

        if any(q in formats for q in QTYPE_IDS):

            formats += f"; {numerics} numerics on the {kernel_variant() or 'torch'} kernels"
        return formats


def load_model(config: EngineConfig) -> LoadedModel:
    """Resolve ``config.model_id`` (a folder, the Hub, a GGUF file, the bundled SmolLM2) and load it: our own
    forward for the Llama family (GGUF blocks kept as stored unless ``quantize`` says otherwise), transformers'
    modules with our paged attention for any other architecture. On the CPU, torch's thread pool (which the
    native kernels follow) is set first.

    Example:
        >>> loaded = load_model(EngineConfig())              # the bundled SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> loaded.model.spec.num_layers, loaded.device.type                                      # doctest: +SKIP
        (30, 'cpu')
    """
    from transformers import AutoConfig, AutoTokenizer

    from tgi_nb.models import resolve_model, source_gguf
    from tgi_nb.models.hf_model import TransformersModel
    from tgi_nb.models.llama import LlamaModel, is_llama_family

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(config.dtype or default_dtype(device))
    kv_dtype = torch_dtype(config.kv_cache_dtype) if config.kv_cache_dtype else dtype
    threads = None
    if device.type == "cpu":
        # torch's intra-op pool; the native kernels take torch.get_num_threads() as their own count
        threads = choose_num_threads(config.num_threads)
        torch.set_num_threads(threads.count)

    started = time.perf_counter()
    resolved = resolve_model(config.model_id, revision=config.revision)
    model_dir = Path(resolved.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if config.chat_template:
        tokenizer.chat_template = config.chat_template
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    if is_llama_family(hf_config):
        gguf_file = source_gguf(model_dir) if config.quantize is None else None
        model = LlamaModel.load(model_dir, dtype=dtype, device=device, config=hf_config, gguf_file=gguf_file,
                                quantize=config.quantize if config.quantize != "float" else None,
                                numerics=config.numerics)
    else:  # transformers' own modules, our paged attention and cache
        model = TransformersModel.load(model_dir, dtype=dtype, device=device,
                                       trust_remote_code=config.trust_remote_code)
    return LoadedModel(model_id=config.model_id or resolved.model_id, model_dir=model_dir, source=resolved.source,
                       tokenizer=tokenizer, model=model, eos_token_ids=eos_token_ids(model_dir, tokenizer),
                       device=device, dtype=dtype, kv_dtype=kv_dtype, weights_bytes=tensor_bytes(model),
                       threads=threads, started=started)
