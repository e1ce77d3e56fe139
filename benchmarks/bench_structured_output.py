"""Structured output that finishes: the share of JSON and tool-call requests that end with valid output.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_structured_output.py             # the full run
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_structured_output.py --markdown  # plus a table for docs/
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_structured_output.py --cases 3   # smoke test

20 fixed cases (a question to answer as JSON, its JSON schema, and a request that calls for a tool) x 5 modes x
2 samplings, with the default model (SmolLM2-135M-Instruct, the bundled copy offline) behind one server, every
request sent at once through the ``openai`` SDK (AsyncOpenAI) so the engine batches them. Modes:

- ``json_object``: ``response_format={"type": "json_object"}``; valid when the content parses as a JSON object.
- ``json_schema``: ``response_format={"type": "json_schema", ...}`` with the case's schema; valid when the content
  parses and matches the schema (``jsonschema``).
- ``required``: ``tool_choice="required"`` with the 5 tools; valid when there is at least one call, every call
  names a tool, its arguments parse and match the tool's parameters, and no call repeats another identically.
- ``required_single``: the same with ``parallel_tool_calls=false``; valid with exactly one such call.
- ``auto``: ``tool_choice="auto"``; valid when the answer is text, or calls valid as for ``required``.

Samplings: ``greedy`` (``temperature=0``) and ``seeded`` (``temperature=0.7``, ``seed`` fixed per case). Every
request has the same ``max_tokens`` (200); a request "finishes" when its ``finish_reason`` is not ``length``.
The figure that matters is the share that finishes with valid output.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import log  # noqa: E402

MODES = ("json_object", "json_schema", "required", "required_single", "auto")
SAMPLINGS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.7}}


def _obj(properties: dict[str, Any], required: Optional[list[str]] = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": _obj({"city": STR, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                           ["city"])}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web and return the top results.",
        "parameters": _obj({"query": STR, "max_results": INT}, ["query"])}},
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression.",
        "parameters": _obj({"expression": STR})}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email.",
        "parameters": _obj({"to": STR, "subject": STR, "body": STR})}},
    {"type": "function", "function": {
        "name": "book_flight", "description": "Book a flight.",
        "parameters": _obj({"origin": STR, "destination": STR, "date": STR, "passengers": INT},
                           ["origin", "destination", "date"])}},
]

# (question answered as JSON, its schema, a request for a tool)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("Give me a small JSON object describing a cat.",
     _obj({"name": STR, "age": INT, "color": STR}), "What's the weather in Paris?"),
    ("Describe Paris as JSON.",
     _obj({"name": STR, "country": STR, "population": INT}), "Search the web for the best pizza in Naples."),
    ("Give a JSON object for a book you like.",
     _obj({"title": STR, "author": STR, "year": INT}), "What is 17 times 23?"),
    ("Return a JSON object describing the planet Mars.",
     _obj({"name": STR, "moons": INT, "has_life": BOOL}), "Email bob@example.com that the meeting moved to 3pm."),
    ("As JSON: a recipe for pancakes.",
     _obj({"name": STR, "ingredients": {"type": "array", "items": STR}, "minutes": INT}),
     "Book a flight from Berlin to Rome on 2025-06-01 for 2 people."),
    ("Give me a JSON object describing a dog.",
     _obj({"breed": STR, "weight_kg": NUM, "friendly": BOOL}), "Is it raining in London right now?"),
    ("Describe the Eiffel Tower in JSON.",
     _obj({"name": STR, "height_m": NUM, "year_built": INT}), "Find recent news about electric cars."),
    ("JSON please: a user profile for Alice, 30 years old.",
     _obj({"name": STR, "age": INT, "email": STR}), "Compute (45 + 55) * 3."),
    ("Give a JSON object listing three colors.",
     _obj({"colors": {"type": "array", "items": STR}}), "Send an email to alice@example.com saying hello."),
    ("Describe a car as a JSON object.",
     _obj({"make": STR, "model": STR, "year": INT, "electric": BOOL}), "I need a flight from Tokyo to Osaka tomorrow."),
    ("Return JSON describing the weather today.",
     _obj({"temperature": NUM, "condition": STR, "humidity": INT}),
     "What's the temperature in New York in fahrenheit?"),
    ("Give a JSON object for a movie.",
     _obj({"title": STR, "director": STR, "year": INT, "rating": NUM}), "Look up who won the 2018 World Cup."),
    ("Describe an apple as JSON.",
     _obj({"fruit": STR, "color": STR, "calories": INT}), "What is the square root of 144?"),
    ("As a JSON object, describe the city of Tokyo.",
     _obj({"city": STR, "country": STR, "population": INT, "capital": BOOL}),
     "Write an email to my boss asking for Friday off."),
    ("Give me JSON describing a smartphone.",
     _obj({"brand": STR, "storage_gb": INT, "price": NUM}), "Book me a flight from Madrid to Lisbon on 2025-07-14."),
    ("JSON object: a student with name and grades.",
     _obj({"name": STR, "grades": {"type": "array", "items": INT}}), "How cold is it in Oslo?"),
    ("Describe the Moon as JSON.",
     _obj({"name": STR, "diameter_km": INT, "distance_km": INT}), "Search for Python tutorials for beginners."),
    ("Give a JSON object for a song.",
     _obj({"title": STR, "artist": STR, "length_seconds": INT}), "Calculate 1024 divided by 8."),
    ("Return a JSON object describing a company.",
     _obj({"name": STR, "employees": INT, "public": BOOL}), "Email support@example.com about my broken order."),
    ("Give me a JSON object describing a bicycle.",
     _obj({"type": STR, "gears": INT, "color": STR}), "Fly me from Paris to Montreal on 2025-09-02, one passenger."),
]


# ---------------------------------------------------------------------------------------------- checking
def _schema_ok(value: Any, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def _calls_ok(calls: list[Any]) -> bool:
    """Every call names a tool with arguments that match its parameters; no call repeated identically."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    seen = set()
    for call in calls:
        name, arguments = call.function.name, call.function.arguments
        if name not in schemas:
            return False
        try:
            args = json.loads(arguments)
        except ValueError:
            return False
        if not isinstance(args, dict) or not _schema_ok(args, schemas[name]):
            return False
        key = (name, json.dumps(args, sort_keys=True))
        if key in seen:
            return False
        seen.add(key)
    return True


def repeated_calls(calls: list[Any]) -> bool:
    keys = [(c.function.name, c.function.arguments) for c in calls]
    return len(set(keys)) < len(keys)


def check(mode: str, case: int, message: Any) -> bool:
    """Whether a finished answer is valid output for ``mode`` (see the module docstring)."""
    calls = message.tool_calls or []
    if mode in ("json_object", "json_schema"):
        try:
            value = json.loads(message.content or "")
        except ValueError:
            return False
        return isinstance(value, dict) and (mode == "json_object" or _schema_ok(value, CASES[case][1]))
    if mode == "required":
        return bool(calls) and _calls_ok(calls)
    if mode == "required_single":
        return len(calls) == 1 and _calls_ok(calls)
    return _calls_ok(calls) if calls else bool((message.content or "").strip())


def request_kwargs(mode: str, case: int, sampling: str, max_tokens: int) -> dict[str, Any]:
    question, schema, tool_request = CASES[case]
    kwargs: dict[str, Any] = {"model": "bench", "max_tokens": max_tokens, **SAMPLINGS[sampling]}
    if sampling == "seeded":
        kwargs["seed"] = 1000 + case
    if mode == "json_object":
        kwargs.update(messages=[{"role": "user", "content": question}], response_format={"type": "json_object"})
    elif mode == "json_schema":
        kwargs.update(messages=[{"role": "user", "content": question}], response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    else:
        kwargs.update(messages=[{"role": "user", "content": tool_request}], tools=TOOLS,
                      tool_choice="auto" if mode == "auto" else "required")
        if mode == "required_single":
            kwargs["parallel_tool_calls"] = False
    return kwargs


# ---------------------------------------------------------------------------------------------- running
async def run_all(url: str, cases: int, max_tokens: int) -> list[dict[str, Any]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1/", api_key="-", max_retries=0, timeout=3600)

    async def one(mode: str, case: int, sampling: str) -> dict[str, Any]:
        row = {"mode": mode, "case": case, "sampling": sampling}
        try:
            completion = await client.chat.completions.create(**request_kwargs(mode, case, sampling, max_tokens))
        except Exception as exc:  # an error is an answer that did not finish; keep the run going
            return {**row, "finish_reason": "error", "valid": False, "error": str(exc)[:200], "tokens": 0}
        choice = completion.choices[0]
        message = choice.message
        finished = choice.finish_reason != "length"
        calls = message.tool_calls or []
        return {**row, "finish_reason": choice.finish_reason, "tokens": completion.usage.completion_tokens,
                "valid": finished and check(mode, case, message), "calls": len(calls),
                "repeated": repeated_calls(calls),
                "output": message.content if not calls else
                [(c.function.name, c.function.arguments) for c in calls]}

    jobs = [one(mode, case, sampling) for sampling in SAMPLINGS for mode in MODES for case in range(cases)]
    async with client:
        return await asyncio.gather(*jobs)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["mode"], row["sampling"])].append(row)
    out = []
    for (mode, sampling), group in groups.items():
        n = len(group)
        out.append({"mode": mode, "sampling": sampling, "n": n,
                    "valid": sum(r["valid"] for r in group) / n,
                    "length": sum(r["finish_reason"] == "length" for r in group) / n,
                    "errors": sum(r["finish_reason"] == "error" for r in group),
                    "repeated": sum(bool(r.get("repeated")) for r in group),
                    "mean_tokens": sum(r["tokens"] for r in group) / n})
    return out


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "tgi_nb"], cwd=root, capture_output=True, text=True)
        return rev.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def main(argv: Optional[list[str]] = None) -> int:
    from tgi_nb.engine import EngineConfig, LLMEngine
    from tgi_nb.models import resolve_model
    from tgi_nb.server import ServerSettings, ServerThread, build_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--cases", type=int, default=len(CASES), help=f"use the first N cases (1-{len(CASES)})")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="write every answer and the summary here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    if not 1 <= args.cases <= len(CASES):
        parser.error(f"--cases: must be between 1 and {len(CASES)}, got {args.cases}")

    revision = git_revision()  # now: the code this process imported, whatever is edited while it runs
    resolved = resolve_model(args.model)
    engine = LLMEngine(EngineConfig(model_id=str(resolved.path), max_input_tokens=1536, max_total_tokens=2048))
    server = ServerThread(build_app(engine, ServerSettings(max_concurrent_requests=1024)), port=0).start()
    requests = args.cases * len(MODES) * len(SAMPLINGS)
    log(f"model {resolved.model_id} ({resolved.source}); {requests} requests, max_tokens={args.max_tokens}")
    try:
        t0 = time.perf_counter()
        rows = asyncio.run(run_all(server.url, args.cases, args.max_tokens))
        wall = time.perf_counter() - t0
    finally:
        server.stop()
        engine.shutdown()
    summary = summarize(rows)
    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3],
               "revision": revision, "wall_s": round(wall, 1), "max_tokens": args.max_tokens}
    log(f"{requests} requests in {wall:.0f} s")
    print(json.dumps(machine))
    header = ["mode", "sampling", "n", "valid and finished", "hit max_tokens", "identical repeated calls",
              "errors", "mean tokens"]
    lines = [[s["mode"], s["sampling"], str(s["n"]), f"{s['valid']:.0%}", f"{s['length']:.0%}",
              str(s["repeated"]), str(s["errors"]), f"{s['mean_tokens']:.0f}"] for s in summary]
    total_valid = sum(r["valid"] for r in rows) / len(rows)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    print(f"all: {total_valid:.0%} valid and finished of {len(rows)}")
    if args.markdown:
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "summary": summary, "rows": rows}, indent=1,
                                        ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
