"""ChatWidget and ParametersWidget against a real server on the tiny random llama, through the real openai
client: streaming append-only updates, Stop freeing the KV blocks, history, errors, parameters reaching the
server. Widgets run without a front-end here (ipywidgets' comms are inert outside a kernel); the browser tests
(test_widgets_browser.py) drive the same widgets in JupyterLab.
"""

from __future__ import annotations

import html
import json
import os
import threading
from pathlib import Path

import pytest
from server_fixtures import BorrowedEngine, SlowEngine, engine, kv_free, running_server, server, wait_until  # noqa: F401

from tgi_nb.widgets import ChatWidget, ParametersWidget

TIMEOUT = 120  # generous: the machine may be loaded; nothing here measures speed


def record_appends(chat: ChatWidget) -> list[str]:
    """The texts the transcript sends to the browser (a spy on the real widget's comm messages)."""
    sent: list[str] = []
    original = chat.transcript.send

    def spy(content, buffers=None):
        sent.append(content["text"])
        original(content, buffers)

    chat.transcript.send = spy
    return sent


@pytest.fixture(scope="module")
def slow_server(engine):
    """The module's engine behind a server whose tokens arrive 50 ms apart: long answers stay in flight."""
    with running_server(SlowEngine(engine, delay=0.05)) as (slow, _):
        yield slow


def test_reply_streams_append_only_and_coalesced(server):
    chat = ChatWidget(server.url, parameters={"max_tokens": 40, "temperature": 0})
    sent = record_appends(chat)
    chat.send("Hello there").wait(TIMEOUT)
    reply = chat.messages[-1]
    assert reply["role"] == "assistant" and reply["content"]
    # Append-only: the browser received exactly the reply, piece by piece, nothing twice.
    assert "".join(sent) == reply["content"]
    stats = chat.last_stats
    assert stats["tokens"] == 40 and stats["finish_reason"] == "length" and not stats["stopped"]
    assert stats["ttft_s"] is not None and stats["error"] is None
    # Coalescing: at most one update per interval while streaming, plus the final flush.
    assert len(sent) <= 2 + (stats["elapsed_s"] - stats["ttft_s"]) / chat.update_interval
    assert stats["updates"] == len(sent)
    final = chat.transcript.entries[-1]
    assert final["role"] == "assistant" and final["text"] == reply["content"] and "40 tokens" in final["stats"]
    assert final["html"]  # rendered as markdown once the reply ended
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_stop_aborts_the_request_and_frees_kv(slow_server, engine):
    chat = ChatWidget(slow_server.url, parameters={"max_tokens": 400})
    chat.send("Tell me a long story")
    assert not chat.stop_button.disabled and not chat.input.ready  # Stop is offered at once, not Send
    assert wait_until(lambda: chat.transcript.appends_sent >= 2, TIMEOUT)
    chat.stop()
    chat.wait(TIMEOUT)
    stats = chat.last_stats
    assert stats["stopped"] and stats["tokens"] < 400 and stats["finish_reason"] is None
    assert chat.messages[-1]["role"] == "assistant"  # what arrived stays
    assert "stopped" in chat.transcript.entries[-1]["stats"]
    assert wait_until(lambda: kv_free(engine), TIMEOUT), engine.stats()
    assert chat.stop_button.disabled and chat.input.ready


def test_stop_before_the_first_token(slow_server, engine):
    chat = ChatWidget(slow_server.url, parameters={"max_tokens": 400})
    chat.send("Hello")
    chat.stop()
    chat.wait(TIMEOUT)
    assert chat.last_stats["stopped"]
    assert wait_until(lambda: kv_free(engine), TIMEOUT), engine.stats()
    chat.parameters = {"max_tokens": 4}
    chat.send("Again").wait(TIMEOUT)  # the widget keeps working
    assert chat.messages[-1]["role"] == "assistant"


def test_two_widgets_on_one_server_stream_at_once(slow_server):
    chats = [ChatWidget(slow_server.url, parameters={"max_tokens": 12}) for _ in range(2)]
    for chat in chats:
        chat.send("Hi")
    for chat in chats:
        chat.wait(TIMEOUT)
        assert chat.last_stats["tokens"] == 12


def test_history_regenerate_edit_and_clear(server):
    chat = ChatWidget(server.url, parameters={"max_tokens": 4})
    chat.send("first").wait(TIMEOUT)
    chat.send("second").wait(TIMEOUT)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert len(chat.transcript.entries) == 4
    chat.regenerate().wait(TIMEOUT)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["first", "second"]
    assert len(chat.messages) == 4 and len(chat.transcript.entries) == 4
    assert chat.edit_last() == "second"
    assert chat.input.value == "second" and len(chat.messages) == 2 and len(chat.transcript.entries) == 2
    chat.clear()
    assert chat.messages == [] and chat.transcript.entries == []
    with pytest.raises(RuntimeError, match="nothing to regenerate"):
        chat.regenerate()


def test_parameters_reach_the_server_and_refusals_show_inline(server):
    params = ParametersWidget(temperature=0.0, max_tokens=5, system_prompt="Be brief.")
    chat = ChatWidget(server.url, parameters=params)
    chat.send("Count").wait(TIMEOUT)
    assert chat.last_stats["tokens"] == 5
    params.set(max_tokens=3)  # what a slider move does
    chat.send("Again").wait(TIMEOUT)
    assert chat.last_stats["tokens"] == 3 and chat.last_stats["finish_reason"] == "length"
    assert "max_tokens=3" in html.unescape(chat.code.value)
    # A value the server refuses: its 400 message in the chat and under the controls; the chat goes on.
    params.set(max_tokens=4000)
    chat.send("Too long").wait(TIMEOUT)
    assert chat.last_stats["error"].startswith("400: ")
    assert "maximum context length" in chat.transcript.entries[-1]["text"]
    assert "maximum context length" in params.error.value
    assert chat.messages[-1]["role"] == "assistant"  # the refused prompt left the history
    params.set(max_tokens=2)
    chat.send("Short").wait(TIMEOUT)
    assert chat.last_stats["tokens"] == 2 and params.error.value == ""


def test_authentication_error_shown(engine):
    with running_server(BorrowedEngine(engine), api_key="secret") as (secured, _):
        chat = ChatWidget(secured.url, parameters={"max_tokens": 2}, api_key="wrong")
        chat.send("Hi").wait(TIMEOUT)
        assert chat.last_stats["error"].startswith("401: ")
        assert chat.transcript.entries[-1]["role"] == "error" and chat.messages == []
        good = ChatWidget(secured.url, parameters={"max_tokens": 2}, api_key="secret")
        good.send("Hi").wait(TIMEOUT)
        assert good.last_stats["error"] is None and good.last_stats["tokens"] == 2


def test_unreachable_server_shown():
    chat = ChatWidget("http://127.0.0.1:9", parameters={"max_tokens": 2})
    chat.send("Hi").wait(TIMEOUT)
    assert chat.last_stats["error"].startswith("cannot reach http://127.0.0.1:9/v1")
    assert not chat.busy and chat.input.ready


def test_closing_a_streaming_widget_leaves_no_thread(slow_server, engine):
    chat = ChatWidget(slow_server.url, parameters={"max_tokens": 400})
    chat.send("Hello")
    assert wait_until(lambda: chat.transcript.appends_sent >= 1, TIMEOUT)
    chat.close()
    assert wait_until(lambda: not any(t.name == "tgi_nb-chat" for t in threading.enumerate()), TIMEOUT)
    assert wait_until(lambda: kv_free(engine), TIMEOUT), engine.stats()


def test_bad_arguments_name_the_field():
    with pytest.raises(TypeError, match="target: expected"):
        ChatWidget(42)
    with pytest.raises(ValueError, match="target: a base URL must start with http"):
        ChatWidget("localhost:8080")
    with pytest.raises(TypeError, match="parameters: expected"):
        ChatWidget("http://127.0.0.1:1", parameters=[1])
    chat = ChatWidget("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="text: the message is empty"):
        chat.send("  ")


def test_a_closed_chat_lets_go_of_shared_parameters():
    """The workbench's chats share one ParametersWidget: a closed one (an endpoint switch) stops following it."""
    params = ParametersWidget(max_tokens=5)
    closed, open_ = ChatWidget("http://127.0.0.1:1", parameters=params), ChatWidget("http://127.0.0.1:1",
                                                                                     parameters=params)
    closed.close()
    params.set(max_tokens=7)
    assert "max_tokens=7" in html.unescape(open_.code.value)
    assert "max_tokens=5" in html.unescape(closed.code.value)
    open_.close()


def test_curl_command_survives_quotes_in_values():
    """The curl line is run by a real shell (curl replaced by a function printing the body it gets): a ' in a
    value must neither end the quoting early nor change the JSON."""
    import json
    import subprocess

    from tgi_nb.widgets.parameters import curl_command

    params = {"stop": ["it's", "'; echo injected; '"], "seed": 3}
    command = curl_command(params)
    shell = 'curl() { for a; do last=$a; done; printf %s "$last"; }\n' + command
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "injected" not in out.stdout.replace("echo injected", ""), out
    assert json.loads(out.stdout)["stop"] == params["stop"]


def test_parameters_widget_values_and_code():
    params = ParametersWidget()
    assert params.params == {"max_tokens": 256}  # always sent: a server's default is the whole context
    params.set(temperature=0.7, top_k=20, stop="END", seed=3, response_format="json_object")
    assert params.params == {"temperature": 0.7, "top_k": 20, "max_tokens": 256, "stop": ["END"], "seed": 3,
                             "response_format": {"type": "json_object"}}
    assert params.create_kwargs()["extra_body"] == {"top_k": 20}
    code = html.unescape(params.code.value)
    assert "extra_body={'top_k': 20}" in code and "curl " in code
    params.set(top_logprobs=3)
    assert params.params["logprobs"] is True and params.params["top_logprobs"] == 3
    params.set(response_format="json_schema")
    assert params.params["response_format"]["json_schema"]["schema"]["required"] == ["answer"]
    with pytest.raises(ValueError, match=r"temperature: must be between 0.0 and 2.0, got 3"):
        params.set(temperature=3)
    with pytest.raises(ValueError, match="response_format: must be one of text, json_object, json_schema"):
        params.set(response_format="xml")
    with pytest.raises(TypeError, match="unknown parameter 'temprature'; allowed: temperature"):
        ParametersWidget(temprature=1)


@pytest.mark.parametrize("module", ["target", "transcript", "parameters", "chat", "lifecycle", "endpoint",
                                    "monitor", "compare", "workbench", "streaming", "controls"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"tgi_nb.widgets.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_replies_render_as_markdown_with_code_blocks():
    from tgi_nb.widgets.transcript import render_markdown

    rendered = render_markdown("Use **this**:\n\n```python\nprint('<hi>')\n```\n<script>alert(1)</script>\n\n"
                               "```nosuchlanguage\n<b>x</b>\n```")
    assert "<strong>this</strong>" in rendered
    # highlighted by Pygments, the code's own "<" escaped
    assert '<code class="language-python"><span class="nb">print</span>' in rendered
    assert '<span class="s1">\'&lt;hi&gt;\'</span>' in rendered
    assert '<code class="language-nosuchlanguage">&lt;b&gt;x&lt;/b&gt;' in rendered  # unknown: escaped as is
    assert "<script>" not in rendered and "<b>" not in rendered  # a model cannot inject markup into the page


def test_background_updates_leave_replies_with_the_main_shell():
    """ipykernel 7.4 routes a widget's incoming messages to the subshell named by its last update's parent. A
    background thread's updates used to carry the kernel's latest request, often a subshell the reloaded page
    had already deleted (JupyterLab's state-restoring comm), so Send stopped answering; in a real kernel, an
    update from a Worker after a request from a soon-gone subshell routes replies to the main shell."""
    from jupyter_client.manager import start_new_kernel

    code = """
import ipywidgets as w
from ipykernel.kernelbase import Kernel
from tgi_nb.widgets.lifecycle import Worker
kernel = Kernel.instance()
parent = kernel.get_parent()
gone = {**parent, "header": {**parent["header"], "subshell_id": "a-deleted-subshell"}}
kernel.set_parent(kernel._shell_parent_ident.get(), gone)   # as a comm_close from that subshell does
button = w.Button()
worker = Worker("test")
worker.start(lambda job: setattr(button, "disabled", True))
assert worker.wait(30)
print("route:", repr(button.comm._reply_subshell_id))
"""
    outputs: list[dict] = []
    repo = str(Path(__file__).resolve().parents[1])
    manager, client = start_new_kernel(env={**os.environ, "PYTHONPATH": repo})
    try:
        reply = client.execute_interactive(code, timeout=TIMEOUT, output_hook=outputs.append)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "route: None" in text, text


def test_a_cut_reply_says_so_and_continue_extends_it(server):
    chat = ChatWidget(server.url, parameters={"max_tokens": 6, "temperature": 0})
    chat.send("Tell me about the sea").wait(TIMEOUT)
    entry = chat.transcript.entries[-1]
    assert "cut at max_tokens (6)" in entry["notice"] and entry["actions"][0][0] == "continue"
    assert entry["settings"].startswith("max_tokens=6, temperature=0")  # what the reply was made with
    tips = dict(entry["stats_parts"])
    assert "Time to first token" in tips[next(t for t in tips if t.startswith("TTFT"))]
    assert "length: cut at max_tokens" in tips["finish_reason: length"]
    first = chat.messages[-1]["content"]
    chat.transcript._front_end_message(chat.transcript, {"op": "action", "name": "continue", "index": 1}, [])
    chat.wait(TIMEOUT)
    # The same reply, longer: the server continued the final assistant message; one Continue, on the last reply.
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] and len(chat.transcript.entries) == 2
    assert chat.messages[-1]["content"].startswith(first) and len(chat.messages[-1]["content"]) > len(first)
    assert chat.transcript.entries[-1]["text"] == chat.messages[-1]["content"]
    assert chat.last_stats["tokens"] == 6
    chat.send("And the mountains?").wait(TIMEOUT)
    assert "actions" not in chat.transcript.entries[1] and "actions" in chat.transcript.entries[-1]


def test_a_reloaded_page_gets_the_whole_streaming_reply(slow_server):
    """The state the kernel sends (to a reloaded page, a second view) holds the text streamed so far and how
    many appends it includes; a view that missed appends asks for it again."""
    chat = ChatWidget(slow_server.url, parameters={"max_tokens": 400})
    sent = record_appends(chat)
    chat.send("Tell me a long story")
    assert wait_until(lambda: len(sent) >= 3, TIMEOUT)
    with chat.transcript._lock:  # no append between the two reads
        state = chat.transcript.get_state("entries")["entries"][-1]
        streamed = chat.transcript.last_text
    assert state["streaming"] and state["text"] == streamed and state["seq"] == len(sent) and streamed
    resent = []
    chat.transcript.send_state = lambda key=None: resent.append(key)
    chat.transcript._front_end_message(chat.transcript, {"op": "sync"}, [])
    assert resent == ["entries"]
    chat.stop()
    chat.wait(TIMEOUT)
    assert "seq" not in chat.transcript.get_state("entries")["entries"][-1]  # ended: a plain message again


def uploaded(name: str, data: bytes) -> dict:
    """A file as ipywidgets' FileUpload holds it once the browser sent it."""
    import datetime

    return {"name": name, "type": "", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


def test_enter_sends_and_the_conversation_exports_and_imports(server):
    import base64
    import re

    chat = ChatWidget(server.url, parameters={"max_tokens": 4}, system_prompt="Be brief.")
    assert "Be brief." in chat.system_line.value  # the system prompt, visible in the chat
    chat.input.value = "Hel"  # what the browser synced so far; Enter sends what the box shows
    chat.input._front_end_message(chat.input, {"op": "submit", "text": "Hello"}, [])
    assert not chat.input.ready  # Enter waits while the reply streams
    chat.wait(TIMEOUT)
    assert chat.messages[0] == {"role": "user", "content": "Hello"} and chat.input.ready
    links = dict(re.findall(r'download="([^"]+)" href="data:[^;]+;base64,([^"]+)"', chat.exports.value))
    exported = json.loads(base64.b64decode(links["chat.json"]))
    assert [m["role"] for m in exported] == ["system", "user", "assistant"] and exported[1]["content"] == "Hello"
    markdown = base64.b64decode(links["chat.md"]).decode()
    assert markdown.startswith("### system\n\nBe brief.") and "### user\n\nHello" in markdown
    # Import into a new chat, from either file: the same conversation, on screen and in the next request.
    for name, content in (("chat.json", json.dumps(exported)), ("chat.md", markdown)):
        other = ChatWidget(server.url, parameters={"max_tokens": 4})
        other.importer.value = (uploaded(name, content.encode()),)
        stripped = [{**m, "content": m["content"].strip()} for m in exported]  # markdown keeps no edge spaces
        assert other.export_messages() == (exported if name.endswith(".json") else stripped), name
        assert [e["role"] for e in other.transcript.entries] == ["user", "assistant"]
        assert "imported" in other.status.value
    other.importer.value = (uploaded("bad.json", b'[{"role": "robot", "content": "x"}]'),)
    assert "messages[0].role: must be one of system, user, assistant" in other.status.value


def test_thinking_streams_folded_above_the_answer_and_compare_counts_it(tmp_path_factory, smollm2_dir):
    """A model that thinks (test_server_reasoning's chain model: "Let me think</think> Paris is the capital."):
    the thinking streams into the reply's reasoning field as it comes, the answer apart; CompareWidget counts
    thinking tokens in a column of their own."""
    from server_fixtures import make_engine, running_server
    from test_server_reasoning import ANSWER, REASONING, TEMPLATE, THINKING_TOKENS, build_chain_model

    from tgi_nb.widgets import CompareWidget

    engine = make_engine(build_chain_model(tmp_path_factory.mktemp("chain"), smollm2_dir))
    try:
        with running_server(engine, chat_template=TEMPLATE) as (srv, _):
            chat = ChatWidget(srv.url, parameters={"max_tokens": 30, "temperature": 0})
            fields: list[tuple[str, str]] = []
            original = chat.transcript.send
            chat.transcript.send = lambda content, buffers=None: (
                fields.append((content["field"], content["text"])), original(content, buffers))
            chat.send("What is the capital of France?").wait(TIMEOUT)
            entry = chat.transcript.entries[-1]
            assert entry["reasoning"].strip() == REASONING and entry["text"].strip() == ANSWER
            assert "".join(t for f, t in fields if f == "reasoning").strip() == REASONING
            assert [f for f, _ in fields] == sorted(f for f, _ in fields)[::-1]  # thinking first, then the answer
            assert chat.last_stats["thinking_tokens"] == THINKING_TOKENS
            assert f"{THINKING_TOKENS} thinking" in entry["stats"]
            assert chat.messages[-1]["content"].strip() == ANSWER  # the history holds the answer only

            compare = CompareWidget([srv.url, (srv.url, {"temperature": 0})], prompts=["Capital of France?"],
                                    parameters={"max_tokens": 30, "temperature": 0})
            compare.run().wait(TIMEOUT)
            assert [r["thinking_tokens"] for r in compare.results] == [THINKING_TOKENS] * 2
            assert "<th>thinking</th>" in compare.table.value
            assert compare.rows()[0]["thinking"].strip() == REASONING
            compare.close()
    finally:
        engine.shutdown()
