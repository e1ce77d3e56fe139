"""The model's recommended sampling settings (vLLM's ``--generation-config``): generation_config.json's
temperature / top_p / top_k / min_p / repetition_penalty apply to OpenAI requests that leave them out, /info
reports them, ``vllm`` turns them off, a folder overrides; the bundled SmolLM2 carries its model card's."""

from __future__ import annotations

import argparse
import json
import shutil

import httpx
import pytest
from openai import OpenAI
from server_fixtures import make_engine, running_server

from tgi_nb.server.launcher import add_serve_arguments, plan_from_options, resolve_options

PROMPT = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def greedy_by_default(tiny_model_dir, tmp_path_factory):
    """The tiny llama whose generation_config.json says temperature 0: greedy unless a request asks else."""
    folder = tmp_path_factory.mktemp("greedy-model")
    for item in tiny_model_dir("llama").iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0,
                                                               "top_k": 7, "do_sample": False}))
    engine = make_engine(folder)
    yield folder, engine
    engine.shutdown()


def answers(client: OpenAI, **kwargs) -> set[str]:
    """The chat answers for three seeds: one answer when the request is greedy."""
    return {client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=12, seed=seed,
                                           **kwargs).choices[0].message.content for seed in (1, 2, 3)}


def test_generation_config_applies_when_a_request_leaves_it_out(greedy_by_default):
    folder, engine = greedy_by_default
    with running_server(engine) as (server, _):
        client = OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)
        assert len(answers(client)) == 1  # temperature 0 from generation_config.json
        assert len(answers(client, temperature=1.0)) > 1  # the request's own value wins
        completions = {client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, seed=seed)
                       .choices[0].text for seed in (1, 2, 3)}
        assert len(completions) == 1  # the completions route too
        assert httpx.get(server.url + "/info").json()["generation_config"] == {"temperature": 0.0, "top_k": 7}
    with running_server(engine, generation_config="vllm") as (server, _):
        client = OpenAI(base_url=server.url + "/v1/", api_key="-", max_retries=0)
        assert len(answers(client)) > 1  # none: OpenAI's temperature 1
        assert httpx.get(server.url + "/info").json()["generation_config"] == {}


def test_generation_config_flag_and_environment(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert plan_from_options(resolve_options(parser.parse_args([]), {})).settings.generation_config == "auto"
    opts = resolve_options(parser.parse_args([]), {"GENERATION_CONFIG": "vllm"})
    assert plan_from_options(opts).settings.generation_config == "vllm"
    opts = resolve_options(parser.parse_args(["--generation-config", str(tmp_path)]), {})
    assert plan_from_options(opts).settings.generation_config == str(tmp_path)
    with pytest.raises(Exception, match="generation_config: must be 'auto', 'vllm' or a folder"):
        plan_from_options(resolve_options(parser.parse_args(["--generation-config", "greedy"]), {}))


def test_the_bundled_smollm2_recommends_its_model_cards_settings(smollm2_dir, tmp_path):
    from tgi_nb.models.loader import BUNDLED_SAMPLING, recommend_sampling

    config = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert {k: config[k] for k in BUNDLED_SAMPLING} == {"temperature": 0.2, "top_p": 0.9}
    # A conversion cached before this (no sampling fields) gets them at its next resolve; a model's own win.
    shutil.copy(smollm2_dir / "generation_config.json", tmp_path)
    old = json.loads((tmp_path / "generation_config.json").read_text())
    old.pop("temperature"), old.pop("top_p")
    (tmp_path / "generation_config.json").write_text(json.dumps({**old, "top_p": 0.5}))
    recommend_sampling(tmp_path, BUNDLED_SAMPLING)
    updated = json.loads((tmp_path / "generation_config.json").read_text())
    assert updated["temperature"] == 0.2 and updated["top_p"] == 0.5 and updated["eos_token_id"] == old["eos_token_id"]
