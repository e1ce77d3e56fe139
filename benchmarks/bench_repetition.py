"""Does a default repetition penalty keep a small model out of loops? The bundled SmolLM2-135M-Instruct at its
recommended settings (temperature 0.2, top_p 0.9), 20 open-ended chat prompts x 2 samples x 200 tokens, at each
repetition penalty; and 10 short factual questions, whose answers a penalty must not spoil.

    .venv/bin/python benchmarks/bench_repetition.py --markdown            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_repetition.py --penalties 1.0 1.1   # two settings only

A sample loops when one word 4-gram comes back 3 times or more (what "He has seen the sea, and he has seen the
sea." for 200 tokens does); also reported: the share of distinct word 4-grams, how many samples ended by
themselves (EOS) rather than at 200 tokens, and how many factual answers name the expected word (greedy).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPEN = ["Tell me about the sea.", "Describe your favourite city.", "Explain how a bicycle works.",
        "Write a short story about a cat.", "What makes a good friend?", "Describe a walk in the forest.",
        "Explain why the sky is blue.", "Tell me about the history of bread.", "How do airplanes fly?",
        "Write a poem about winter.", "What is machine learning?", "Describe a busy market.",
        "Give advice to a new student.", "Explain how rain forms.", "Tell me about elephants.",
        "What is the best way to learn a language?", "Describe a thunderstorm.", "How does a computer work?",
        "Write a letter to a friend about a holiday.", "Explain what a volcano is."]
FACTS = [("What is the capital of France? Answer in one word.", "paris"),
         ("What is the capital of Japan? Answer in one word.", "tokyo"),
         ("How many legs does a spider have? Answer with a number.", "8|eight"),
         ("What colour is the sky on a clear day? Answer in one word.", "blue"),
         ("What is 2 + 3? Answer with a number.", "5|five"),
         ("Which planet is known as the Red Planet? Answer in one word.", "mars"),
         ("What is the largest ocean on Earth? Answer in one word.", "pacific"),
         ("What gas do plants take in? Answer in one word.", "carbon dioxide|co2|co₂"),
         ("What is the freezing point of water in Celsius? Answer with a number.", "0|zero"),
         ("Who wrote Romeo and Juliet? Answer with a name.", "shakespeare")]
NGRAM = 4


def loops(text: str, n: int = NGRAM, times: int = 3) -> bool:
    """True when a word n-gram comes back ``times`` times or more.

    Example:
        >>> loops("He has seen the sea, and he has seen the sea, and he has seen the sea.")
        True
        >>> loops("The sea is wide and deep, and its waves are grey in winter.")
        False
    """
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def distinct(text: str, n: int = NGRAM) -> float:
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.05, 1.1, 1.2])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--samples", type=int, default=2, help="samples per open prompt (default: %(default)s)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

    results = {}
    with LLMEngine(EngineConfig(max_total_tokens=1024)) as engine:
        def chat(prompt: str) -> str:
            return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)

        for penalty in args.penalties:
            params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.2, top_p=0.9, seed=1234,
                                    n=args.samples, repetition_penalty=penalty)
            outs = [o for r in engine.generate_sync([chat(p) for p in OPEN], params) for o in r.outputs]
            facts = engine.generate_sync([chat(q) for q, _ in FACTS], SamplingParams(
                max_new_tokens=16, temperature=0, repetition_penalty=penalty))
            right = sum(bool(re.search(rf"\b({a})\b", r.outputs[0].text.lower())) for r, (_, a) in zip(facts, FACTS))
            looping = [o.text for o in outs if loops(o.text)]
            results[penalty] = {"samples": len(outs), "looping": len(looping),
                                "distinct_4grams": sum(distinct(o.text) for o in outs) / len(outs),
                                "ended_by_eos": sum(o.finish_reason == "stop" for o in outs),
                                "facts_right": right, "facts": len(FACTS),
                                "a_loop": looping[0][:160] if looping else ""}
            print(f"repetition_penalty={penalty}: {results[penalty]}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        print(f"SmolLM2-135M-Instruct, temperature 0.2, top_p 0.9, {len(OPEN)} prompts x {args.samples} samples x "
              f"{args.max_tokens} tokens; {len(FACTS)} factual questions, greedy.\n")
        print("| repetition_penalty | samples looping | distinct 4-grams | ended by EOS | factual answers right |")
        print("|---|---|---|---|---|")
        for penalty, r in results.items():
            print(f"| {penalty} | {r['looping']}/{r['samples']} ({100 * r['looping'] / r['samples']:.0f}%) | "
                  f"{100 * r['distinct_4grams']:.0f}% | {r['ended_by_eos']}/{r['samples']} | "
                  f"{r['facts_right']}/{r['facts']} |")
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
