"""How far each weight format moves SmolLM2-135M-Instruct's predictions from the float32 model, on a fixed text.

    .venv/bin/python benchmarks/bench_accuracy.py --markdown          # README.md as the text, 4 chat prompts
    .venv/bin/python benchmarks/bench_accuracy.py --max-tokens 512 --formats gguf q8_0    # quicker
    .venv/bin/python benchmarks/bench_accuracy.py --gguf FILE --formats gguf fast --markdown    # a K-quant file

Formats (``EngineConfig.quantize``): ``gguf`` (the default: the bundled GGUF's Q4_1 / Q8_0 blocks as stored,
exact numerics), ``fast`` (the same blocks with ``--numerics fast``: activations quantized to int8 per block, as
llama.cpp computes), ``q8_0`` and ``q4_0`` (the float32 model quantized at load, as ``--quantize``), each against
``float`` (every weight float32; the GGUF dequantized). ``--gguf FILE`` takes another GGUF file than the bundled
one (e.g. a Q4_K_M of benchmarks/gguf_files.py): its blocks as stored against its own dequantized weights. The text (default: the project's README.md, a file that
ships with it) is cut into windows of ``--window`` tokens, each run as one sequence in chunks of 64 tokens so
every product takes the small-batch kernels a decode step uses. Per format: perplexity ratio (format / float),
mean and p99 KL divergence KL(float || format) over positions, top-1 agreement, and over ``--prompts`` chat
prompts the first position where greedy outputs (``--greedy-tokens`` each) differ from float's ("-": none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import log, percentile  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis to a child.", "List three prime numbers and say why each is prime."]
CHUNK = 64


def window_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's next-token logits at every position of one sequence, fed in chunks of 64."""
    from tgi_nb.models.attention import AttentionBatch

    s = model.spec
    block = 16
    blocks = -(-len(ids) // block)
    caches = [(torch.zeros(blocks, block, s.num_kv_heads, s.head_dim), torch.zeros(blocks, block, s.num_kv_heads,
                                                                                     s.head_dim))
              for _ in range(s.num_layers)]
    table = torch.arange(blocks)
    out = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        n = len(chunk)
        batch = AttentionBatch(slot_mapping=torch.arange(start, start + n), num_decodes=0, decode_block_tables=None,
                               decode_context_lens=None, prefills=[(0, n, start, table)])
        logits = model.forward(torch.tensor(chunk), torch.arange(start, start + n), batch, caches, torch.arange(n))
        out.append(torch.log_softmax(logits.double(), dim=-1))
    return torch.cat(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    parser.add_argument("--max-tokens", type=int, default=4096, help="text tokens scored (default: %(default)s)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--formats", nargs="+", default=["gguf", "fast", "q8_0", "q4_0"],
                        choices=["gguf", "fast", "q8_0", "q4_0"])
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--gguf", help="a GGUF file instead of the bundled SmolLM2-135M Q4_1")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from tgi_nb.engine import EngineConfig, LLMEngine, SamplingParams

    torch.manual_seed(0)
    results, reference, ref_greedy = {}, None, None
    for fmt in ["float", *args.formats]:
        quantize = None if fmt in ("gguf", "fast") else fmt
        numerics = "fast" if fmt == "fast" else "exact"
        with LLMEngine(EngineConfig(model_id=args.gguf, quantize=quantize, numerics=numerics,
                                    max_total_tokens=2048)) as engine:
            log(f"[{fmt}] weights: {engine.model.weight_formats()}")
            ids = engine.tokenizer.encode(Path(args.text).read_text(), add_special_tokens=False)[:args.max_tokens]
            with torch.inference_mode():
                log_probs = torch.cat([window_log_probs(engine.model, ids[i:i + args.window])[:-1]
                                       for i in range(0, len(ids), args.window) if len(ids[i:i + args.window]) > 1])
            targets = torch.tensor([t for i in range(0, len(ids), args.window) for t in ids[i + 1:i + args.window]])
            greedy = []
            for prompt in PROMPTS:
                text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                            add_generation_prompt=True)
                greedy.append(engine.generate_sync(text, SamplingParams(
                    max_new_tokens=args.greedy_tokens, temperature=0, ignore_eos=True)).outputs[0].token_ids)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
        if reference is None:
            reference, ref_nll, ref_greedy = log_probs, nll, greedy
            log(f"[float] {len(targets)} positions, perplexity {torch.exp(nll.mean()).item():.3f}")
            continue
        kld = (reference.exp() * (reference - log_probs)).sum(-1).clamp_min(0)
        divergence = []
        for ours, ref in zip(greedy, ref_greedy):
            diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
            divergence.append("-" if diff is None else str(diff))
        results[fmt] = {
            "positions": len(targets),
            "perplexity": torch.exp(nll.mean()).item(), "perplexity_float": torch.exp(ref_nll.mean()).item(),
            "perplexity_ratio": torch.exp(nll.mean() - ref_nll.mean()).item(),
            "kld_mean": kld.mean().item(), "kld_p99": percentile(kld.tolist(), 99),
            "top1_agreement": (log_probs.argmax(-1) == reference.argmax(-1)).double().mean().item(),
            "first_greedy_divergence": divergence}
        log(f"[{fmt}] {results[fmt]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        print(f"{args.gguf or 'The bundled Q4_1 GGUF'}: "
              f"{next(iter(results.values()))['positions']} positions of {Path(args.text).name}, windows of "
              f"{args.window} tokens fed in chunks of {CHUNK}; greedy: {len(PROMPTS)} chat prompts x "
              f"{args.greedy_tokens} tokens.\n")
        print("| weights | perplexity ratio | mean KLD | p99 KLD | top-1 agreement | first greedy divergence |")
        print("|---|---|---|---|---|---|")
        for fmt, r in results.items():
            print(f"| {fmt} | {r['perplexity_ratio']:.4f} | {r['kld_mean']:.5f} | {r['kld_p99']:.5f} | "
                  f"{100 * r['top1_agreement']:.2f}% | {', '.join(r['first_greedy_divergence'])} |")
    else:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
