"""Reference decoding with transformers, shared by the engine tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Prompts of varied length (after tokenization: a handful to a few hundred tokens).
PROMPTS = [
    "Hello",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime, in detail.",
    "Once upon a time, in a faraway land, there lived a king who had three daughters. " * 3,
    "def fibonacci(n):\n    ",
    "Translate to French: I like cheese and bread with butter.",
    "¿Dónde está la biblioteca? Ça va très bien, merci. 日本語のテキスト。",
    "A" * 40,
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Why is the sky blue?",
    "1, 2, 3, 4, 5,",
    "In 1492, Columbus sailed the ocean blue. " * 6,
    "Q: What is 2 + 2?\nA:",
    "Photosynthesis is the process by which",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
]


class TransformersReference:
    """Greedy decoding and logits from transformers' own model, one prompt at a time."""

    def __init__(self, model_dir, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model.eval()

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float], list[torch.Tensor]]:
        """Greedy tokens (EOS ignored), the top-1/top-2 logit margin at each step, and log-softmaxes."""
        ids = torch.tensor([prompt_ids])
        out = self.model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        tokens, margins, logprobs = [], [], []
        logits = out.logits[0, -1]
        for _ in range(max_new_tokens):
            top2 = torch.topk(logits.double(), 2).values
            margins.append(float(top2[0] - top2[1]))
            logprobs.append(torch.log_softmax(logits.double(), -1))
            token = int(logits.argmax())
            tokens.append(token)
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
        return tokens, margins, logprobs


def assert_same_greedy(ours: list[int], ref: list[int], margins: list[float], clear_margin: float = 0.0,
                       label: str = "") -> None:
    """Token-identical, except that after a position where the reference's top-2 logits are within
    ``clear_margin`` (a near-tie that summation order may flip) the rest is not compared."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert margins[i] <= clear_margin, (
                f"{label}: token {i} differs ({a} vs transformers {b}) with a clear top-2 margin "
                f"{margins[i]:.4f}; ours={ours}, ref={ref}")
            return
        if margins[i] <= clear_margin:
            return
    assert len(ours) == len(ref), f"{label}: {len(ours)} tokens vs {len(ref)}"


def reference_linear(x, w, bias=None, residual=None, norm=None, silu_mul=False):
    """What every native linear kernel (and its fusions) computes, in float64: the tests' reference."""
    x, w = x.double(), w.double()
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm[0].double(), norm[1])
    out = x @ w.T
    if bias is not None:
        out = out + bias.double()
    if residual is not None:
        out = out + residual.double()
    if silu_mul:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out
