"""GGUF files as people download them, made by llama.cpp's own tools, once per machine: Q4_K_M, Q5_K_M, Q6_K and
Q8_0 of the bundled SmolLM2-135M-Instruct, and of a SmolLM2-1.7B-shaped model (its config: hidden 2048, 24 layers,
32 heads, 32 kv heads, intermediate 8192, vocabulary 49152, tied embeddings; random weights from a fixed seed, the
bundled tokenizer) for the benchmarks.

Each model is written as a Hugging Face folder (the bundled model: its cached float32 conversion; the 1.7B shape:
float16 weights generated tensor by tensor), converted to an f32 / f16 GGUF by the sdist's ``convert_hf_to_gguf.py``
and quantized by ``llama-quantize`` (both from benchmarks/llama_server.py, built once). Files are cached under
``$TGI_NB_CACHE/gguf`` (``~/.cache/tgi_nb/gguf``); the intermediate folder and f16 file of the 1.7B shape are
deleted once its quants are made (they take 7 GB).

    $ python benchmarks/gguf_files.py                               # the bundled model's four quants
    $ python benchmarks/gguf_files.py --model smollm2-1.7b-shape --quants Q4_K_M

Prints one path per line.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_server import converter_path, find_llama_tool  # noqa: E402

QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
MODELS = ("smollm2-135m", "smollm2-1.7b-shape")
# SmolLM2-1.7B-Instruct's config.json (the values that shape the compute); the rest as the bundled 135M's.
SMOLLM2_1_7B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, head_dim=64, max_position_embeddings=8192, rope_theta=130000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=49152)
SEED = 1700


def cache_dir() -> Path:
    root = os.environ.get("TGI_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgi_nb")
    return Path(root) / "gguf"


def gguf_path(model: str, quant: str) -> Path:
    """Where ``model``'s ``quant`` file is (or will be) cached."""
    return cache_dir() / model / f"{model}.{quant}.gguf"


def make(model: str, quants: list[str], log=print) -> list[Path]:
    """The ``quants`` files of ``model``, made on first call (under a lock: one maker per model at a time)."""
    if model not in MODELS:
        raise ValueError(f"model: must be one of {', '.join(MODELS)}, got {model!r}")
    for quant in quants:
        if quant not in QUANTS:
            raise ValueError(f"quants: each must be one of {', '.join(QUANTS)}, got {quant!r}")
    wanted = [gguf_path(model, q) for q in quants]
    if all(p.is_file() for p in wanted):
        return wanted
    quantize = find_llama_tool("llama-quantize", log=log)
    if quantize is None:
        raise RuntimeError("llama-quantize is not available on this machine (see benchmarks/llama_server.py)")
    folder = cache_dir() / model
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [(q, p) for q, p in zip(quants, wanted) if not p.is_file()]
        if missing:
            with tempfile.TemporaryDirectory(prefix="gguf-", dir=folder) as tmp:
                source = _float_gguf(model, Path(tmp), log)
                for quant, path in missing:
                    log(f"{model}: llama-quantize {quant}")
                    _run([quantize, str(source), str(path.with_suffix(".tmp")), quant, str(os.cpu_count() or 2)],
                         folder / "quantize.log")
                    os.replace(path.with_suffix(".tmp"), path)
    return wanted


def _float_gguf(model: str, tmp: Path, log) -> Path:
    """``model`` as an unquantized GGUF (f32 for the 135M, f16 for the 1.7B shape) in ``tmp``."""
    if model == "smollm2-135m":
        from tgi_nb.models import resolve_model

        hf_folder, outtype = resolve_model().path, "f32"
    else:
        hf_folder, outtype = _random_1_7b(tmp / "hf", log), "f16"
    out = tmp / f"{model}.{outtype}.gguf"
    log(f"{model}: convert_hf_to_gguf --outtype {outtype}")
    env = dict(os.environ)
    if importlib.util.find_spec("sentencepiece") is None:
        # The converter imports sentencepiece before it looks for a tokenizer.model, which SmolLM2 has none of.
        stub = tmp / "stub"
        stub.mkdir()
        (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), env.get("PYTHONPATH")]))
    _run([sys.executable, str(converter_path()), str(hf_folder), "--outtype", outtype, "--outfile", str(out)],
         cache_dir() / model / "convert.log", env)
    return out


def _random_1_7b(out: Path, log) -> Path:
    """A SmolLM2-1.7B-shaped Hugging Face folder: float16 weights N(0, 0.02) from a fixed seed (norms 1), written
    one tensor at a time (3.4 GB), the bundled tokenizer."""
    import torch
    from transformers import LlamaConfig

    from tgi_nb.models import resolve_model
    from tgi_nb.models.gguf_convert import stream_safetensors

    bundled = resolve_model().path
    config = LlamaConfig.from_pretrained(bundled)
    for key, value in SMOLLM2_1_7B.items():
        setattr(config, key, value)
    config.architectures = ["LlamaForCausalLM"]
    out.mkdir(parents=True)
    config.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                 "dtype": "float16"}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (bundled / name).is_file():
            shutil.copy2(bundled / name, out / name)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})

    def maker(index: int, name: str, shape):
        def read():
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.float16)
            g = torch.Generator().manual_seed(SEED + index)
            return (torch.randn(shape, generator=g) * 0.02).half()
        return name, shape, read

    log(f"smollm2-1.7b-shape: writing random float16 weights (seed {SEED}) to {out}")
    stream_safetensors(out / "model.safetensors", [maker(k, n, s) for k, (n, s) in enumerate(shapes.items())],
                       {"format": "pt"}, dtype=torch.float16)
    return out


def _run(cmd: list[str], log_file: Path, env=None) -> None:
    with open(log_file, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated, of {', '.join(QUANTS)}")
    args = parser.parse_args()
    for path in make(args.model, [q for q in args.quants.split(",") if q],
                     log=lambda m: print(m, file=sys.stderr, flush=True)):
        print(path)


if __name__ == "__main__":
    main()
