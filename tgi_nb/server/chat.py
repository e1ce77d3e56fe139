"""Turning OpenAI chat messages into the prompt text a model was trained on (its chat template)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import BadRequest
from .protocol import ChatCompletionRequest, ChatMessage
from .tools import ToolPlan, tool_messages_as_text


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """A Jinja chat template given inline or as a path to a file (as ``--chat-template`` accepts).

    Example:
        >>> load_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")[:6]
        '{% for'
    """
    if not value:
        return None
    if "{" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ValueError(f"chat_template: {value!r} is neither a Jinja template nor an existing file")
    return value


def parts_text(parts: list[Any], param: str) -> str:
    """The text of content parts (``text`` / ``input_text`` / ``output_text`` / ``refusal``, the chat and
    Responses kinds); any other part is a 400 naming ``param.j.type``.

    Example:
        >>> parts_text([{"type": "input_text", "text": "a"}, {"type": "text", "text": "b"}], "input.0.content")
        'a\\nb'
    """
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise BadRequest(f"{param}.{j}.type: only text parts are supported by this text-only model, got "
                             f"{kind!r}", param=f"{param}.{j}.type")
    # vLLM joins text parts with a newline; so do we, so that prompts match across servers.
    return "\n".join(texts)


def _content_text(message: ChatMessage, index: int) -> Optional[str]:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    return parts_text(content, f"messages.{index}.content")


def to_template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts as chat templates expect them: string content, ``developer`` as ``system``,
    tool-call arguments parsed to objects (templates render them with ``tojson``).

    Example:
        >>> to_template_messages([ChatMessage(role="developer", content=[{"type": "text", "text": "Be brief"}])])
        [{'role': 'system', 'content': 'Be brief'}]
    """
    out = []
    for i, message in enumerate(messages):
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                "content": _content_text(message, i)}
        if item["content"] is None:
            item["content"] = ""
        if message.name is not None:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        thinking = message.reasoning_content or message.reasoning
        if thinking:
            item["reasoning_content"] = thinking
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                call = dict(call)
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass
                call["function"] = function
                calls.append(call)
            item["tool_calls"] = calls
        out.append(item)
    return out


def template_supports_tools(template: str) -> bool:
    """True when a chat template renders tool definitions and tool calls itself (Llama 3.1, Qwen 2.5,
    Hermes, Mistral...); such a template gets ``tools=`` and the messages as they are.

    Example:
        >>> template_supports_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
        False
    """
    return bool(re.search(r"\btools\b", template)) and "tool_calls" in template


def render_chat(tokenizer, messages: Sequence[ChatMessage], *, chat_template: Optional[str] = None,
                add_generation_prompt: Optional[bool] = None, continue_final_message: Optional[bool] = None,
                tools: Optional[list[dict[str, Any]]] = None, tool_instructions: Optional[str] = None,
                chat_template_kwargs: Optional[dict[str, Any]] = None) -> str:
    """The prompt text for ``messages``, rendered with the model's chat template.

    A conversation ending with an assistant message is continued (the model writes on from where that
    message stops) unless ``continue_final_message=False``; otherwise the generation prompt opens the
    assistant's turn. Raises :class:`BadRequest` when the model has no template or rendering fails.

    ``tools`` go to a template that renders them (:func:`template_supports_tools`); for any other template
    ``tool_instructions`` (the tools described in text) join the system message, and tool calls and
    tool results in the conversation are written out as text (:func:`tools.tool_messages_as_text`).

    Example:
        >>> from transformers import AutoTokenizer                                     # doctest: +SKIP
        >>> tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> render_chat(tok, [ChatMessage(role="user", content="Hi")])                # doctest: +SKIP
        '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM...<|im_start|>assistant\\n'
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise BadRequest("this model has no chat template, so /v1/chat/completions cannot format messages: "
                         "start the server with --chat-template, or use /v1/completions", param="messages")
    rendered = to_template_messages(messages)
    native_tools = template_supports_tools(template)
    if not native_tools:
        rendered = tool_messages_as_text(rendered, tool_instructions if tools else None)
    if continue_final_message is None:
        continue_final_message = rendered[-1]["role"] == "assistant" and not add_generation_prompt
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if continue_final_message and rendered[-1]["role"] != "assistant":
        raise BadRequest("continue_final_message: the last message must have role 'assistant'",
                         param="continue_final_message")
    if continue_final_message and add_generation_prompt:
        raise BadRequest("continue_final_message and add_generation_prompt cannot both be true",
                         param="add_generation_prompt")
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("messages", "tokenize", "add_generation_prompt", "continue_final_message", "chat_template"):
        if reserved in kwargs:
            raise BadRequest(f"chat_template_kwargs: {reserved!r} cannot be set here", param="chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(
            rendered, tools=tools if native_tools else None, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            **kwargs)
    except BadRequest:
        raise
    except Exception as exc:  # a template's own raise_exception(), a missing variable...
        raise BadRequest(f"messages: the chat template could not render them: {exc}", param="messages") from exc


def render_chat_request(tokenizer, req: ChatCompletionRequest, tools: ToolPlan,
                        chat_template: Optional[str] = None,
                        template_kwargs: Optional[dict[str, Any]] = None) -> str:
    """:func:`render_chat` for a chat completion request and its planned ``tools``: the prompt
    /v1/chat/completions generates from, and /chat_tokenize shows. ``template_kwargs`` replace the
    request's ``chat_template_kwargs`` (the generation path adds what the reasoning effort maps to)."""
    return render_chat(tokenizer, req.messages, chat_template=chat_template,
                       add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message,
                       tools=tools.template_tools, tool_instructions=tools.instructions(),
                       chat_template_kwargs=req.chat_template_kwargs if template_kwargs is None else template_kwargs)
