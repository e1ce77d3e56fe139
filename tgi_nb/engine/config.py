"""Engine configuration: limits named as text-generation-launcher names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tgi_nb.models.loader import DEFAULT_MODEL_ID

from .capacity import limit_conflict
from .sampling_params import ValidationError

# The element types weights and the KV cache may have, by torch's names (the one list: the launcher's checks,
# the loader's torch dtypes and the KV cache's come from it).
DTYPES = ("float32", "bfloat16", "float16", "float64")


# How weights are held (CPU, float32; elsewhere every weight is a float tensor of ``dtype``):
# - None: as stored: a GGUF model's Q4_0 / Q4_1 / Q8_0 tensors stay in their blocks (native kernels, exact
#   numerics), everything else in dtype;
# - "float": every weight dequantized to dtype (what tgi_nb did before it kept GGUF blocks);
# - "q8_0", "q4_0": float linear weights quantized at load into those blocks (TGI's --quantize), the embedding
#   into q8_0.
QUANTIZE_CHOICES = (None, "float", "q8_0", "q4_0")
# How products with quantized weights compute (CPU, float32):
# - "exact": the weights' blocks x float32 activations; the dequantized model's numbers, only rounding differs;
# - "fast": llama.cpp's numerics: activations quantized to int8 per block of 32, integer dot products (AVX-512 VNNI,
#   AVX2); several times the arithmetic per cycle for batches and prompts, and a few greedy tokens differ
#   (benchmarks/bench_accuracy.py).
NUMERICS_CHOICES = ("exact", "fast")      # tgi_nb.models.quant.NUMERICS (not imported here: it loads torch)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start; None means "derive from the model and memory".

    - ``max_input_tokens``: longest prompt accepted (TGI's MAX_INPUT_TOKENS).
    - ``max_total_tokens``: prompt + new tokens of one request (TGI's MAX_TOTAL_TOKENS).
    - ``max_batch_prefill_tokens``: prompt tokens computed in one step; longer prompts prefill in chunks.
    - ``max_batch_total_tokens``: KV cache capacity in tokens over all sequences, exactly, unless it exceeds the
      memory budget. When None it is ``kv_cache_memory`` bytes if given, else sized for the work
      (:func:`tgi_nb.engine.capacity.plan_capacity` decides every limit and says why it lowered any).
    - ``max_num_seqs``: sequences running at once; ``max_concurrent_requests`` (the server's admission limit),
      when smaller, is what the default KV cache is sized for.
    - ``kv_cache_dtype``: the KV cache's element type (None: the model's dtype); ``float16`` halves its bytes
      on the CPU, where float32 and float16 caches run the native kernels.
    - ``num_threads``: torch's and the native kernels' threads; None: the CPUs of the affinity mask, within
      the cgroup's CPU quota.
    - ``enforce_eager`` (CUDA; vLLM's name): run decode steps op by op instead of replaying CUDA graphs.
    - ``cuda_memory_fraction`` (CUDA; TGI's name): the share of the GPU's memory this engine may use, weights
      included; the KV cache is sized for the work within it (a notebook holds other tensors on the GPU too).

    Example:
        >>> EngineConfig(max_input_tokens=1024, max_total_tokens=2048).block_size
        16
    """

    model_id: str = DEFAULT_MODEL_ID
    revision: Optional[str] = None
    dtype: Optional[str] = None          # one of DTYPES; None: by device
    device: Optional[str] = None         # "cpu" | "cuda"; None: cuda when available
    quantize: Optional[str] = None       # see QUANTIZE_CHOICES
    numerics: str = "exact"              # see NUMERICS_CHOICES
    max_input_tokens: Optional[int] = None
    max_total_tokens: Optional[int] = None
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: Optional[int] = None
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache_memory: Optional[int] = None
    kv_cache_dtype: Optional[str] = None
    max_concurrent_requests: Optional[int] = None
    enable_prefix_caching: bool = True
    num_threads: Optional[int] = None
    chat_template: Optional[str] = None
    trust_remote_code: bool = False
    enforce_eager: bool = False
    cuda_memory_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_input_tokens", "max_total_tokens", "max_batch_total_tokens", "kv_cache_memory",
                     "num_threads", "max_concurrent_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValidationError(name, f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("max_batch_prefill_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValidationError(name, f"{name}: must be an integer >= 1, got {value!r}")
        conflict = limit_conflict(max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens)
        if conflict:
            raise ValidationError(*conflict)
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValidationError("quantize", f"quantize: must be one of {', '.join(map(str, QUANTIZE_CHOICES))}, "
                                              f"got {self.quantize!r}")
        if self.numerics not in NUMERICS_CHOICES:
            raise ValidationError("numerics", f"numerics: must be one of {', '.join(NUMERICS_CHOICES)}, "
                                              f"got {self.numerics!r}")
        for name in ("dtype", "kv_cache_dtype"):
            value = getattr(self, name)
            if value not in (None, *DTYPES):
                raise ValidationError(name, f"{name}: must be one of {', '.join(DTYPES)}, got {value!r}")
        if not isinstance(self.cuda_memory_fraction, (int, float)) or not 0 < self.cuda_memory_fraction <= 1:
            raise ValidationError("cuda_memory_fraction", f"cuda_memory_fraction: must be in (0, 1], "
                                                          f"got {self.cuda_memory_fraction!r}")
