"""Shared fixtures: the real SmolLM2-135M-Instruct (bundled, converted once) and tiny random models.

Tests never use the network: HF_HUB_OFFLINE is set here, before anything imports huggingface_hub
(it reads the variable once, at import).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tokenizers' thread pool and fork() (subprocess servers, kernels) warn and can deadlock together.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the GPU path's Triton kernels run in Triton's interpreter, which must be chosen before anything
# imports triton (its own helpers are jitted at import); the NVIDIA device files say so without importing torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tgi_nb.models import quant  # noqa: E402  (after HF_HUB_OFFLINE: it imports nothing of huggingface_hub)

TINY_ARCHS = ("llama", "qwen2", "qwen3")

# Files that make up a tokenizer in a model folder (as the Hub and our GGUF conversion write them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder: from the HF cache if it is there, else the bundled GGUF,
    converted once (about 30 s the first time on this machine, then cached under ~/.cache/tgi_nb)."""
    from tgi_nb.models import resolve_model

    return resolve_model().path


def _tiny_config(arch: str, vocab_size: int, overrides: dict):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        # SmolLM2's tokenizer: <|im_start|> = 1, <|im_end|> = 2 ends a chat turn.
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    if arch == "qwen2":  # Qwen2 always has q/k/v biases
        return Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    if arch == "qwen3":  # Qwen3 always has q/k RMSNorm
        return Qwen3Config(**{**common, "tie_word_embeddings": False, **overrides})
    raise ValueError(f"arch: must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")


def _randomize(model, std: float, seed: int = 0) -> None:
    """Re-draw every parameter from a private generator, so weights depend on the seed only.

    Large weights keep logits far from flat, so greedy decoding picks varied tokens. Norm weights
    stay near 1 and biases get noise (zero biases would hide a bias that the engine forgot to add).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Callable[..., Path]:
    """A factory of tiny random-weight models with SmolLM2's real tokenizer and chat template.

    ``make(arch, dtype=torch.float32, **config_overrides) -> Path`` with ``arch`` in llama, qwen2, qwen3:
    2 layers, hidden 64, 4 heads of 16, 2 KV heads, vocabulary 49152, context 2048; tied embeddings for
    llama only. Same arguments, same folder (built once per session) and the same weights in every dtype.

    Example (in a test):
        path = tiny_model_dir("qwen3", dtype=torch.float64, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1e4})
    """
    import torch

    built: dict[str, Path] = {}

    def make(arch: str, dtype: torch.dtype = torch.float32, **config_overrides) -> Path:
        key = json.dumps([arch, str(dtype), config_overrides], sort_keys=True, default=str)
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, dtype, smollm2_dir,
                                          **config_overrides)
        return built[key]

    return make


def build_tiny_model(out: Path, arch: str = "llama", dtype=None, tokenizer_dir=None, **config_overrides) -> Path:
    """Write a tiny random-weight model (see ``tiny_model_dir``) with SmolLM2's tokenizer into ``out``; also
    for scripts outside pytest (tests/api_fuzz.py, tests/soak.py).

    Example:
        path = build_tiny_model(Path(tempfile.mkdtemp()))     # a float32 llama
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tgi_nb.models import resolve_model

    dtype = dtype or torch.float32
    tokenizer_dir = Path(tokenizer_dir or resolve_model().path)
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = _tiny_config(arch, vocab_size, config_overrides)
    # Built and randomized in float32, then cast: every dtype gets the same (rounded) weights.
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model, std=config.initializer_range)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(params=quant.runnable_variants())
def quant_variant(request, monkeypatch):
    """Each quantized-kernel variant this CPU runs (avx512vnni, avx512, avx2, generic), forced through
    ``TGI_NB_QUANT_KERNEL`` for the test; skipped where that build failed."""
    if quant.vector_width(request.param) is None:
        pytest.skip(f"the {request.param} kernel did not build")
    monkeypatch.setenv("TGI_NB_QUANT_KERNEL", request.param)
    return request.param
