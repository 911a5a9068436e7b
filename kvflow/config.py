"""One validated engine configuration: a tree of frozen dataclasses, checked at construction.

`ModelConfig` is parsed from a Hugging Face `config.json` (both the transformers-4 spelling,
`rope_scaling` + `rope_theta`, and the transformers-5 one, `rope_parameters`), or from a GGUF file's
metadata turned into that dict (`kvflow/gguf_config.py`). The other parts
hold cache and scheduler knobs. Every check raises `ValueError` naming the field and its range.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from kvflow.gguf_config import hf_config_from_gguf, is_gguf_path

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "LongConvForCausalLM",
)
# Long-convolution language models (kvflow/model/longconv/): no attention; each layer convolves its
# input with a learned kernel as long as the context, so what a KV block holds is that input.
LONGCONV_ARCHITECTURE = "LongConvForCausalLM"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content. A malformed file raises ValueError naming the file, line and column (json's own
    message names neither the file nor what was being read)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name to a torch dtype, with a clear error for anything else."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {name}")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'; got {name!r}")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as the checkpoint states them."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in cls.SUPPORTED:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(cls.SUPPORTED)}"
            )
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
        )


@dataclass(frozen=True)
class LongConvConfig:
    """The sequence mixer of a long-convolution model ("Simple Hardware-Efficient Long Convolutions",
    Fu et al. 2023): per channel a causal kernel of `kernel_length` taps, learned directly and kept
    smooth by squashing (k <- sign(k)·max(|k| - squash_lambda, 0)) after an optional moving average of
    `smooth_width` taps (1: none). Tokens further back than the kernel reaches contribute nothing."""

    kernel_length: int
    squash_lambda: float = 0.0
    smooth_width: int = 1

    def __post_init__(self) -> None:
        if self.kernel_length < 1:
            raise ValueError(f"longconv kernel_length must be >= 1, got {self.kernel_length}")
        if not self.squash_lambda >= 0:
            raise ValueError(f"longconv squash_lambda must be >= 0, got {self.squash_lambda}")
        if self.smooth_width < 1 or self.smooth_width % 2 == 0:
            raise ValueError(f"longconv smooth_width must be an odd number >= 1, got {self.smooth_width}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], max_positions: int) -> LongConvConfig:
        return cls(kernel_length=int(hf.get("kernel_length", max_positions)),
                   squash_lambda=float(hf.get("squash_lambda", 0.0)), smooth_width=int(hf.get("smooth_width", 1)))


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, independent of where its weights live."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per-layer sliding window (None = full attention), e.g. Mistral or Qwen2 with use_sliding_window.
    sliding_windows: tuple[int | None, ...] = ()
    dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Linear weights in a quantised format: stored so (a kvflow-quantised checkpoint's
    # `quantization_config`) or quantised as they load (`--quantization`); None: as the checkpoint's dtype.
    quantization: QuantizationConfig | None = None
    # Where the tokenizer comes from when not from `path` itself: a directory (or a GGUF file).
    tokenizer: str | None = None
    # A long-convolution model's mixer (None: attention). Such a model has no heads; its KV cache holds
    # each layer's conv inputs, hidden_size values per token, which the KV-cache spec describes as one
    # kv head of width hidden_size / 2 in each of its two planes (kvflow/attention/conv_history.py).
    longconv: LongConvConfig | None = None

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: str | torch.dtype = "auto", max_model_len: int | None = None,
        tokenizer: str | os.PathLike | None = None,
    ) -> ModelConfig:
        """From a Hugging Face directory's config.json, or a llama-architecture GGUF file's metadata."""
        if tokenizer is not None and not (Path(tokenizer).is_dir() or is_gguf_path(tokenizer)):
            raise ValueError(f"tokenizer {tokenizer} is neither a directory nor a .gguf file")
        if is_gguf_path(path):
            hf = hf_config_from_gguf(path)
        else:
            config_path = Path(path) / "config.json"
            if not config_path.is_file():
                raise ValueError(f"model directory {path} has no config.json")
            hf = read_json(config_path)
        cfg = cls.from_hf_dict(hf, str(path), dtype=dtype, max_model_len=max_model_len)
        return replace(cfg, tokenizer=str(tokenizer)) if tokenizer is not None else cfg

    @classmethod
    def from_hf_dict(
        cls,
        hf: dict[str, Any],
        path: str = "",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
    ) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = int(hf["hidden_size"])
        num_layers = int(hf["num_hidden_layers"])
        if arch == LONGCONV_ARCHITECTURE:
            if hidden % 2:
                raise ValueError(f"a long-conv model's hidden_size must be even (its conv history is split in "
                                 f"two planes), got {hidden}")
            hf = {**hf, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": hidden // 2}
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        is_qwen2 = arch == "Qwen2ForCausalLM"
        is_qwen3 = arch == "Qwen3ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))

        if dtype == "auto":
            dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        torch_dtype = parse_dtype(dtype)

        ctx = int(hf.get("max_position_embeddings", 2048))
        if max_model_len is not None:
            if not 1 <= max_model_len <= ctx:
                raise ValueError(
                    f"max_model_len must be in [1, {ctx}] (the model's max_position_embeddings), "
                    f"got {max_model_len}"
                )
            ctx = max_model_len

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            path=path,
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_model_len=ctx,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=RopeConfig.from_hf(hf),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not (is_qwen2 or is_qwen3),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=is_qwen3,
            sliding_windows=_sliding_windows(hf, arch, num_layers),
            dtype=torch_dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            quantization=QuantizationConfig.from_hf(hf.get("quantization_config"), path),
            longconv=(LongConvConfig.from_hf(hf, int(hf.get("max_position_embeddings", 2048)))
                      if arch == LONGCONV_ARCHITECTURE else None),
        )

    def with_quantization(self, requested: QuantizationConfig) -> ModelConfig:
        """This model quantised at load as `requested` (`--quantization`). A checkpoint already quantised
        takes only a request for its own format, which changes nothing."""
        current = self.quantization
        if current is None or current.on_load:
            return replace(self, quantization=requested)
        if (requested.format, requested.bits, requested.group_size) == (current.format, current.bits,
                                                                      current.group_size):
            if requested.lm_head and not current.lm_head:
                raise ValueError(f"{self.path} is stored quantised ({current.describe()}) with a dense LM head: "
                                 "--quantization-lm-head quantises the head of a dense checkpoint at load (or "
                                 "`kvflow quantize --lm-head` stores it quantised)")
            if requested.activation_bits not in (None, current.activation_bits):  # a runtime choice
                return replace(self, quantization=replace(current, activation_bits=requested.activation_bits))
            return self
        raise ValueError(f"{self.path} is already quantised ({current.describe()}); quantization="
                         f"{requested.describe()} would quantise it again: load it as it is, or quantise "
                         "its dense checkpoint")


def _sliding_windows(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window, following each architecture's own convention."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if window and layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if arch == "MistralForCausalLM":
        return tuple(int(window) if window else None for _ in range(num_layers))
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and window and hf.get("use_sliding_window"):
        first = int(hf.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return tuple(None for _ in range(num_layers))


# Weight formats (kvflow/model/quant/formats.py holds their table: blocks, bytes, quantisers, kernels).
QUANT_FORMATS = ("q8_0", "q4_0", "q4_k", "int8", "bipolar")
# The code bits and group (weights sharing a scale along K) each format fixes; None: the whole row.
_FIXED_QUANT = {"q8_0": (8, 32), "q4_0": (4, 32), "q4_k": (4, 256), "int8": (8, None)}
# bipolar: bits 2..8 and a group that is a multiple of 8 (whole bytes of each bit plane).
BIPOLAR_DEFAULT_BITS, BIPOLAR_DEFAULT_GROUP = 4, 64
# `quantization_config.quant_method` of the checkpoints kvflow writes (kvflow/model/quant/checkpoint.py).
QUANT_METHOD = "kvflow"
_QUANT_KEYS = ("quant_method", "format", "bits", "group_size", "activation_bits", "lm_head")
_SUPPORTED_QUANT = (f"checkpoints quantised by kvflow (quant_method '{QUANT_METHOD}': {', '.join(QUANT_FORMATS)}; "
                    f"`kvflow quantize`), GGUF files (Q8_0, Q4_0, Q4_K blocks run as stored), or a dense "
                    f"checkpoint quantised at load (--quantization {'|'.join(QUANT_FORMATS)})")


@dataclass(frozen=True)
class QuantizationConfig:
    """Linear weights in one of `QUANT_FORMATS` (the embedding stays in the model's dtype; the LM head
    too unless `lm_head`: quantised like the projections, at load or as `kvflow quantize --lm-head` stored
    it; a lossy option, as llama.cpp's quantised `output.weight`, that takes the head's matmul off the
    float path of every decode step).

    `bits` and `group_size` are filled in from the format where it fixes them (bipolar: 4 and 64 by
    default); `activation_bits` picks how activations meet the weights: int8 with 8 runs W8A8
    (dynamic per-token int8 activations), bipolar with A runs the A-bit bit-plane variant; None keeps
    float activations. `on_load`: the checkpoint is dense and is quantised (round to nearest) as it loads.
    """

    format: str
    bits: int | None = None
    group_size: int | None = None
    activation_bits: int | None = None
    on_load: bool = False
    lm_head: bool = False

    def __post_init__(self) -> None:
        fmt = self.format
        if fmt not in QUANT_FORMATS:
            raise ValueError(f"quantization format must be one of {', '.join(QUANT_FORMATS)}; got {fmt!r}")
        if fmt in _FIXED_QUANT:
            bits, group = _FIXED_QUANT[fmt]
            if self.bits not in (None, bits):
                raise ValueError(f"{fmt} stores {bits}-bit codes; got bits={self.bits} (bipolar takes 2..8)")
            if self.group_size not in (None, group):
                what = f"blocks of {group}" if group else "one scale per output channel"
                raise ValueError(f"{fmt} has {what}; got group_size={self.group_size} (bipolar takes any "
                                 "multiple of 8)")
        else:
            bits = BIPOLAR_DEFAULT_BITS if self.bits is None else self.bits
            group = BIPOLAR_DEFAULT_GROUP if self.group_size is None else self.group_size
            if not 2 <= bits <= 8:
                raise ValueError(f"bipolar bits must be in [2, 8], got {bits}")
            if group < 8 or group % 8:
                raise ValueError(f"bipolar group_size must be a positive multiple of 8, got {group}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", group)
        act = self.activation_bits
        if act is not None:
            if fmt == "int8" and act != 8:
                raise ValueError(f"int8 weights take activation_bits 8 (W8A8) or none (W8A16), got {act}")
            if fmt == "bipolar" and not 2 <= act <= 8:
                raise ValueError(f"bipolar activation_bits must be in [2, 8], got {act}")
            if fmt in ("q8_0", "q4_0", "q4_k"):
                raise ValueError(f"{fmt} runs with float activations; activation_bits is for int8 (8: W8A8) "
                                 "and bipolar (2..8)")

    def activation_bits_for(self, weight_format: str) -> int | None:
        """The activation bits a weight of `weight_format` runs with: the configured ones for weights of the
        configured format, None (float activations) for any other (a checkpoint's other-format tensors)."""
        return self.activation_bits if weight_format == self.format else None

    @property
    def params(self) -> dict[str, int]:
        """What the format's quantiser takes (kvflow/model/quant/formats.py)."""
        return {"bits": self.bits, "group_size": self.group_size} if self.format == "bipolar" else {}

    def describe(self) -> str:
        extra = f" {self.bits}-bit, group {self.group_size}" if self.format == "bipolar" else ""
        act = f", {self.activation_bits}-bit activations" if self.activation_bits else ""
        head = ", LM head quantised" if self.lm_head else ""
        return f"{self.format}{extra}{act}{head}"

    @classmethod
    def from_hf(cls, qc: Any, path: str = "") -> QuantizationConfig | None:
        """A config.json's `quantization_config`: kvflow's own, else refused with what is supported."""
        if qc is None:
            return None
        where = f"{path}: " if path else ""
        if not isinstance(qc, dict):
            raise ValueError(f"{where}quantization_config must be an object, got {qc!r}")
        method = qc.get("quant_method")
        if method != QUANT_METHOD:
            what = ("GPTQ with act-order (desc_act)" if method == "gptq" and qc.get("desc_act")
                    else f"quantization_config.quant_method {method!r}")
            raise ValueError(f"{where}{what} is not supported. kvflow loads {_SUPPORTED_QUANT}")
        unknown = sorted(set(qc) - set(_QUANT_KEYS))
        if unknown:
            raise ValueError(f"{where}quantization_config has keys kvflow does not write: {', '.join(unknown)} "
                             f"(it writes {', '.join(_QUANT_KEYS)})")
        if "format" not in qc:
            raise ValueError(f"{where}quantization_config names no format (one of {', '.join(QUANT_FORMATS)})")
        lm_head = qc.get("lm_head", False)
        if not isinstance(lm_head, bool):
            raise ValueError(f"{where}quantization_config.lm_head must be true or false, got {lm_head!r}")
        return cls(qc["format"], qc.get("bits"), qc.get("group_size"), qc.get("activation_bits"), lm_head=lm_head)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format": self.format, "bits": self.bits,
                               "group_size": self.group_size}
        if self.activation_bits is not None:
            out["activation_bits"] = self.activation_bits
        if self.lm_head:
            out["lm_head"] = True
        return out


@dataclass(frozen=True)
class LoadConfig:
    """How a checkpoint's weights become the model's: `quantization` quantises a dense checkpoint's
    linear layers as they load (round to nearest, like vLLM's `--quantization` for formats that need no
    calibration); a checkpoint that is already quantised loads as stored."""

    quantization: str | None = None
    quantization_bits: int | None = None
    quantization_group_size: int | None = None
    quantization_activation_bits: int | None = None
    quantization_lm_head: bool = False

    def __post_init__(self) -> None:
        self.quantization_config()

    def quantization_config(self) -> QuantizationConfig | None:
        if self.quantization is None:
            if (self.quantization_bits, self.quantization_group_size, self.quantization_activation_bits) != (
                    None, None, None) or self.quantization_lm_head:
                raise ValueError("quantization_bits, quantization_group_size, quantization_activation_bits and "
                                 "quantization_lm_head need a quantization format")
            return None
        return QuantizationConfig(self.quantization, self.quantization_bits, self.quantization_group_size,
                                  self.quantization_activation_bits, on_load=True, lm_head=self.quantization_lm_head)


# KV-cache formats (kvflow/attention/kv_spec.py says what a block of each holds): "auto" keeps the
# model's dtype; the dense dtypes store keys and values as computed; "int8" stores int8 codes with
# one fp32 scale per token and kv head (symmetric); "fp8_e4m3" stores float8 codes with one scale
# per layer and kv head, given (kv_scale) or calibrated from the first prompt; "kivi4"/"kivi2" store
# KIVI's 4-/2-bit asymmetric codes (keys per channel, values per token, groups of 32) and keep each
# sequence's newest kv_residual_tokens tokens in the model's dtype.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8", "fp8_e4m3", "kivi4", "kivi2")
KIVI_CACHE_DTYPES = ("kivi4", "kivi2")
_DENSE_KV = ("bfloat16", "float16", "float32")
# KV offload tiers (kvflow/kv_transfer/offload/): how the file tier does its I/O (direct: O_DIRECT;
# buffered: through the page cache; auto: whichever a read probe finds faster), and when a tier hit is loaded
# (auto: when the performance model says loading beats recomputing; always: every hit, for measuring).
KV_OFFLOAD_IO = ("auto", "direct", "buffered")
KV_OFFLOAD_LOAD_RULES = ("auto", "always")
# KIVI's group: tokens per key group (per channel), channels per value group (kvflow/attention/kivi.py).
KIVI_GROUP = 32

# KV policies (kvflow/core/kv_policy.py defines one class per name; docs/kv_cache.md): what a
# sequence keeps of its KV (streaming, h2o, snapkv evict) or reads each decode step (quest, specontext).
KV_POLICIES = ("none", "streaming", "h2o", "snapkv", "quest", "specontext")

# SnapKV's observation window (the last prompt queries whose attention selects what is kept).
SNAPKV_DEFAULT_WINDOW = 32
# SpeContext's recent window: the newest tokens every decode reads besides the selection (the shipped
# retrieval head was trained to score only tokens older than this: kvflow/train/retrieval.py).
SPECONTEXT_DEFAULT_WINDOW = 32


def kv_policy_window(policy: str, budget: int, sink_tokens: int, window: int | None) -> int:
    """The recent window a policy keeps (or reads) when `--kv-window` is not given: streaming keeps
    everything the budget leaves after the sinks; h2o splits the rest evenly between heavy hitters
    and recent tokens (H2O's default); snapkv observes its last 32 prompt queries; quest always
    reads only the newest block; specontext reads the newest 32 tokens' blocks."""
    if window is not None:
        return window
    if policy == "streaming":
        return budget - sink_tokens
    if policy == "h2o":
        return (budget - sink_tokens) // 2
    if policy == "snapkv":
        return SNAPKV_DEFAULT_WINDOW
    if policy == "specontext":
        return min(SPECONTEXT_DEFAULT_WINDOW, budget - sink_tokens)
    return 0


@dataclass(frozen=True)
class KVPolicySettings:
    """One request's KV policy, resolved from the engine's flags and its own overrides."""

    policy: str
    budget: int
    sink_tokens: int
    window: int


def resolve_kv_policy(cache: CacheConfig, policy: str | None = None,
                      budget: int | None = None) -> KVPolicySettings | None:
    """A request's policy: its own `kv_policy`/`kv_budget` where given, else the engine's. None: keep
    all KV. Raises ValueError naming the field when the combination cannot run."""
    name = cache.kv_policy if policy is None else policy
    budget = cache.kv_budget if budget is None else budget
    where = "" if policy is None and budget is None else "request "
    check_kv_policy(name, budget, cache.kv_sink_tokens, cache.kv_window, where)
    if name == "none":
        return None
    if cache.kv_cache_dtype in KIVI_CACHE_DTYPES:
        check_kivi_policy(cache, name, budget, where)
    if name == "quest" and cache.kv_policy != "quest":
        raise ValueError("request kv_policy quest needs the engine started with --kv-policy quest (which keeps "
                         "each block's key bounds)")
    if name == "specontext" and not cache.has_retrieval_head:
        raise ValueError("request kv_policy specontext needs the engine started with --kv-policy specontext or "
                         "--retrieval-model (which load the retrieval head and keep its keys)")
    assert budget is not None
    return KVPolicySettings(name, budget, cache.kv_sink_tokens,
                            kv_policy_window(name, budget, cache.kv_sink_tokens, cache.kv_window))


def check_kivi_policy(cache: CacheConfig, policy: str, budget: int | None, where: str = "") -> None:
    """KIVI combines with snapkv, and with streaming whose window keeps every evicted block quantised
    (window >= kv_residual_tokens + 32: the ring's tokens are never evicted); raise ValueError otherwise."""
    if policy in ("none", "snapkv"):
        return
    if policy != "streaming":
        raise ValueError(f"{where}kv_policy={policy} with kv_cache_dtype {cache.kv_cache_dtype} is not supported "
                         "(KIVI combines with snapkv and streaming; every policy with int8 and fp8_e4m3)")
    assert budget is not None
    window = kv_policy_window(policy, budget, cache.kv_sink_tokens, cache.kv_window)
    least = cache.kv_residual_tokens + KIVI_GROUP
    if window < least:
        raise ValueError(f"{where}kv_policy=streaming with kv_cache_dtype {cache.kv_cache_dtype} needs a window of at "
                         f"least kv_residual_tokens + 32 = {least} tokens (evicted blocks must be quantised); got "
                         f"{window}: raise kv_budget or kv_window, or lower kv_residual_tokens")


def check_kv_policy(policy: str, budget: int | None, sink_tokens: int, window: int | None,
                    where: str = "") -> None:
    """Raise ValueError naming the field unless (policy, budget, sinks, window) is a usable policy."""
    if policy not in KV_POLICIES:
        raise ValueError(f"{where}kv_policy must be one of {', '.join(KV_POLICIES)}, got {policy!r}")
    if policy == "none":
        return
    if budget is None:
        raise ValueError(f"{where}kv_budget (tokens kept or read per sequence) is required with kv_policy={policy}")
    if budget < 1:
        raise ValueError(f"{where}kv_budget must be >= 1 token, got {budget}")
    resolved = kv_policy_window(policy, budget, sink_tokens, window)
    least = 1 if policy in ("streaming", "snapkv") else 0  # these keep at least one recent token
    if resolved < least or sink_tokens + resolved > budget:
        shown = resolved if resolved >= least else f"at least {least}"
        raise ValueError(f"{where}kv_budget={budget} is smaller than kv_sink_tokens + kv_window = {sink_tokens} + "
                         f"{shown} (kv_policy={policy}): give a larger budget or a smaller window")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size, memory budget and prefix caching."""

    # Tokens per KV block; None: 16, or 32 with KIVI (its key groups are 32 tokens).
    block_size: int | None = None  # an int once constructed
    # GiB for the KV cache; None = derived from free memory (see `worker/kv_budget.default_kv_cache_bytes`).
    kv_cache_memory: float | None = None
    # Exact block count, overriding the memory budget (tests use it to force preemption).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # What a KV block stores: "auto" (the model's dtype), a dense dtype, or a quantised format.
    kv_cache_dtype: str = "auto"
    # fp8_e4m3: the scale of every layer's keys and values (None: calibrated per layer and kv head
    # from the first prompt; instances exchanging KV need a given scale).
    kv_scale: float | None = None
    # What each sequence keeps of its KV (streaming, h2o, snapkv) or reads per decode step (quest),
    # within `kv_budget` tokens; requests may override the policy and budget (SamplingParams), and
    # with kv_policy "none" the budget is the default of requests that choose a policy.
    kv_policy: str = "none"
    kv_budget: int | None = None
    # SpeContext: the retrieval head directory (kvflow/model/retrieval_head.py) that selects what each
    # decode reads; None: the shipped one, for the shipped model with kv_policy specontext. Given with
    # another policy, requests may still choose specontext.
    retrieval_model: str | None = None
    # SpeContext's adaptive memory (kvflow/core/kv_residency.py; CPU, Linux): GiB of physical memory the
    # KV blocks may occupy. The pool (`kv_cache_memory`, which may then exceed it) becomes address space
    # whose pages cost memory once written; as sequences grow, a memory model moves the upper layers' KV
    # of SpeContext sequences' older blocks to a file under `kv_spill_dir` (default: the system's
    # temporary directory) and gives their pages back, so a long generation fits a small memory.
    kv_resident_memory: float | None = None
    kv_spill_dir: str | None = None
    # Attention sinks: the first tokens, always kept (streaming, h2o) or read (quest).
    kv_sink_tokens: int = 4
    # Recent tokens always kept or read (SnapKV: its observation window); None: per policy
    # (`kv_policy_window`).
    kv_window: int | None = None
    # KIVI (kivi4, kivi2): the newest tokens of each sequence kept in the model's dtype, R (a
    # multiple of 32; older ones are quantised 32 at a time).
    kv_residual_tokens: int = 128
    # KV offload (kvflow/kv_transfer/offload/): full cached blocks are also kept in a file tier under
    # this directory (and, with kv_offload_host_size, a host-memory tier in front of it), which outlive
    # the working pool and the server; a prefix hit there is loaded instead of recomputed.
    kv_offload_dir: str | None = None
    kv_offload_size: float = 16.0  # GiB the file tier may hold (at most the free disk space)
    kv_offload_host_size: float = 0.0  # GiB of the host-memory tier (0: none)
    kv_offload_io: str = "auto"
    kv_offload_load: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size is None:
            object.__setattr__(self, "block_size", KIVI_GROUP if self.kv_cache_dtype in KIVI_CACHE_DTYPES else 16)
        if self.kv_sink_tokens < 0:
            raise ValueError(f"kv_sink_tokens must be >= 0, got {self.kv_sink_tokens}")
        if self.kv_window is not None and self.kv_window < 0:
            raise ValueError(f"kv_window must be >= 0, got {self.kv_window}")
        check_kv_policy(self.kv_policy, self.kv_budget, self.kv_sink_tokens, self.kv_window)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_scale is not None and (self.kv_cache_dtype != "fp8_e4m3" or not self.kv_scale > 0):
            raise ValueError(f"kv_scale must be a positive number, with kv_cache_dtype fp8_e4m3; got {self.kv_scale} "
                             f"with {self.kv_cache_dtype}")
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.kv_cache_dtype in KIVI_CACHE_DTYPES:
            if self.block_size % KIVI_GROUP:
                raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} quantises keys in groups of 32 tokens: "
                                 f"block_size must be a multiple of 32 (e.g. --block-size 32), got {self.block_size}")
            if self.kv_residual_tokens < 0 or self.kv_residual_tokens % KIVI_GROUP:
                raise ValueError(f"kv_residual_tokens must be a multiple of 32 (>= 0), got {self.kv_residual_tokens}")
            check_kivi_policy(self, self.kv_policy, self.kv_budget)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        self._check_offload()
        self._check_residency()

    def _check_residency(self) -> None:
        if self.kv_resident_memory is None:
            if self.kv_spill_dir is not None:
                raise ValueError("kv_spill_dir holds what kv_resident_memory moves out of memory: give "
                                 "--kv-resident-memory too")
            return
        if not self.kv_resident_memory > 0:
            raise ValueError(f"kv_resident_memory must be > 0 GiB, got {self.kv_resident_memory}")
        if not self.has_retrieval_head:
            raise ValueError("kv_resident_memory keeps SpeContext sequences' older KV out of memory: it needs "
                             "--kv-policy specontext (or --retrieval-model)")
        if self.kv_cache_dtype in KIVI_CACHE_DTYPES:
            raise ValueError(f"kv_resident_memory does not support kv_cache_dtype {self.kv_cache_dtype} (SpeContext "
                             "does not read KIVI caches)")

    @property
    def has_retrieval_head(self) -> bool:
        """Whether the engine loads a retrieval head (so requests may choose kv_policy specontext)."""
        return self.kv_policy == "specontext" or self.retrieval_model is not None

    @property
    def kv_offload(self) -> bool:
        """Whether KV offload tiers are on (a file tier, a host tier or both)."""
        return self.kv_offload_dir is not None or self.kv_offload_host_size > 0

    def _check_offload(self) -> None:
        if self.kv_offload_io not in KV_OFFLOAD_IO:
            raise ValueError(f"kv_offload_io must be one of {', '.join(KV_OFFLOAD_IO)}, got {self.kv_offload_io!r}")
        if self.kv_offload_load not in KV_OFFLOAD_LOAD_RULES:
            raise ValueError(f"kv_offload_load must be one of {', '.join(KV_OFFLOAD_LOAD_RULES)}, "
                             f"got {self.kv_offload_load!r}")
        if not self.kv_offload_size > 0 or not self.kv_offload_host_size >= 0:
            raise ValueError(f"kv_offload_size must be > 0 GiB and kv_offload_host_size >= 0 GiB; got "
                             f"{self.kv_offload_size} and {self.kv_offload_host_size}")
        if self.kv_offload_dir is not None and not str(self.kv_offload_dir).strip():
            raise ValueError("kv_offload_dir must name a directory")
        if not self.kv_offload:
            return
        if not self.enable_prefix_caching:
            raise ValueError("KV offload keeps prefix-cached blocks: enable_prefix_caching must be on")
        if self.kv_cache_dtype in KIVI_CACHE_DTYPES:
            raise ValueError(f"KV offload does not support kv_cache_dtype {self.kv_cache_dtype} yet (a KIVI "
                             "sequence's newest tokens live outside its blocks): use auto, a dense dtype, int8 "
                             "or fp8_e4m3")


# Waiting-queue policies (kvflow/core/policies.py defines one class per name).
QUEUE_POLICIES = ("fcfs", "priority", "lpm")
# How a batch handed over at once is ordered (kvflow/core/policies.py): as it came, or BatchLLM's
# prefix-tree groups; "auto" groups a batch of at least `prefix_tree_min_batch` requests.
BATCH_POLICIES = ("fcfs", "prefix-tree", "auto")
# What limits admission: at most `max_num_seqs` running (vLLM's rule), or the KV cache alone (keeping
# `kv_watermark` of it free); "auto": the KV cache while a prefix-tree plan orders the queue.
ADMISSION_RULES = ("auto", "seqs", "memory")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    # Prompt chunks and decodes share a step. Off: a step that can admit a waiting prompt computes
    # prompts only and running decodes wait (vLLM v0's scheduler; DistServe's colocated baseline).
    mixed_batching: bool = True
    # lpm: a waiting request is passed over at most this many times before it is taken next, so a
    # stream of prefix hits cannot starve a request nothing is cached for.
    starvation_limit: int = 32
    # BatchLLM (kvflow/core/policies.py, PrefixTreePolicy): requests that arrive together are grouped
    # by shared prefix (kvflow/core/prefix_tree.py), each group's prefix computed once and held until
    # its last member finishes, decode-heavy groups first. The offline API defaults to "auto".
    batch_policy: str = "fcfs"
    prefix_tree_min_batch: int = 32
    admission: str = "auto"
    # Memory admission: a request is admitted only if this fraction of the KV blocks stays free after
    # it, room for the running requests' next tokens (fewer preemptions).
    kv_watermark: float = 0.05

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.policy not in QUEUE_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(QUEUE_POLICIES)}; got {self.policy!r}")
        if self.batch_policy not in BATCH_POLICIES:
            raise ValueError(f"batch_policy must be one of {', '.join(BATCH_POLICIES)}; got {self.batch_policy!r}")
        if self.batch_policy == "prefix-tree" and self.policy != "fcfs":
            raise ValueError(f"batch_policy prefix-tree orders the queue itself; it cannot combine with policy "
                             f"{self.policy} (use policy fcfs, or batch_policy fcfs)")
        if self.admission not in ADMISSION_RULES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_RULES)}; got {self.admission!r}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.starvation_limit < 0:
            raise ValueError(f"starvation_limit must be >= 0, got {self.starvation_limit}")
        if self.prefix_tree_min_batch < 1:
            raise ValueError(f"prefix_tree_min_batch must be >= 1, got {self.prefix_tree_min_batch}")

    @property
    def groups_batches(self) -> bool:
        """Whether the queue may group batches by prefix (prefix-tree, or auto under plain fcfs)."""
        return self.batch_policy == "prefix-tree" or (self.batch_policy == "auto" and self.policy == "fcfs")


# Speculative decoding (kvflow/worker/spec_decode/): who proposes the tokens the model verifies.
SPECULATIVE_METHODS = ("draft", "ngram")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: each step a proposer guesses up to `num_speculative_tokens` next tokens
    of every decoding request, the model scores them all in one pass, and rejection sampling keeps a
    prefix of them so that outputs are distributed exactly as without speculation (greedy outputs are
    the same tokens). Off (`speculative_method` None) by default; requests may opt out
    (`SamplingParams.speculative`)."""

    # "ngram": prompt lookup (the last n tokens matched earlier in prompt + output; what followed is
    # proposed), n from `prompt_lookup_max` down to `prompt_lookup_min`. "draft": a small model with
    # the target's vocabulary (`speculative_model`).
    speculative_method: str | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # The adaptive rule: proposals verified per step across the batch. A verification step costs
    # about a decode step while the step is small (the weights are read once for all positions) and
    # grows with its tokens once it is large; so each of B decoding requests verifies at most
    # min(K, budget // B) proposals: all K alone, fewer as the batch grows, none past `budget` requests.
    speculative_token_budget: int = 8

    def __post_init__(self) -> None:
        method = self.speculative_method
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}; got {method!r}")
        if method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method draft needs speculative_model (a model directory with the "
                             "target's vocabulary)")
        if self.speculative_model and method != "draft":
            raise ValueError(f"speculative_model is for speculative_method draft, not {method}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if self.speculative_token_budget < 0:
            raise ValueError(f"speculative_token_budget must be >= 0, got {self.speculative_token_budget}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @property
    def enabled(self) -> bool:
        return self.speculative_method is not None


ATTENTION_BACKENDS = ("auto", "torch", "triton")
QUANT_ACTIVATIONS = ("exact", "q8")


@dataclass(frozen=True)
class RunnerConfig:
    """How the model runs, not what it computes: switches for speed-only code paths."""

    # bf16 linear weights prepacked for oneDNN on CPU (bit-identical outputs, faster matmuls);
    # off = plain torch linears, the reference the bench checks the fast path against.
    prepack_weights: bool = True
    # CPU: run the decoder stack as one C++ call per step (kvflow/csrc/cpu_model.cpp; equal to the
    # PyTorch modules up to fp32 summation order); off = the PyTorch modules.
    cpu_kernels: bool = True
    # bf16 on a CPU with AVX512-BF16, with the C++ forward: keep a second, row-blocked copy of each
    # weight matrix for a decode GEMV that streams it faster than oneDNN (steps of <= 4 tokens).
    # Costs the weights' size again in memory; off = oneDNN for every step.
    decode_gemv: bool = True
    # Decodes that share leading KV blocks (prefix caching) read them once per group instead of once
    # per sequence, in the C++ forward and the Triton backend (kvflow/attention/shared_prefix.py;
    # equal up to fp32 summation order). Off = each decode reads its whole context.
    shared_prefix_attention: bool = True
    # Attention backend: "auto" = Triton kernels on CUDA, torch-native (plus the C++ forward) on
    # CPU; "torch" or "triton" force one. Triton on CPU runs only under TRITON_INTERPRET=1 (tests),
    # and turns the C++ forward off, since that forward has its own attention.
    attention_backend: str = "auto"
    # Weights in GGUF's q8_0 / q4_0 / q4_k: "exact" keeps the activations in float (the dequantised
    # weights' product up to fp32 rounding); "q8" rounds them to int8 per block of 32 as llama.cpp
    # does, for VNNI integer dot products. Not speed-only: a lossy option (each activation moves by
    # up to half its block's step). int8 weights choose at load (quantization_activation_bits).
    quant_activations: str = "exact"

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.quant_activations not in QUANT_ACTIVATIONS:
            raise ValueError(f"quant_activations must be one of {QUANT_ACTIVATIONS}, got {self.quant_activations!r}")


MAX_LORA_RANK_LIMIT = 256


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (kvflow/model/lora.py, kvflow/worker/lora_manager.py): requests name an adapter
    (PEFT's format) and run it beside the base model and other adapters in the same step.

    `max_loras` adapters are resident in a step's slots (distinct adapters among running requests; a
    request for another waits, it is never refused); up to `max_cpu_loras` more stay loaded in host
    memory (least recently used dropped first) and are read from disk again when needed."""

    enable_lora: bool = False
    # "NAME=DIR" entries served from the start (the offline API also takes a {name: dir} mapping).
    lora_modules: tuple[str, ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max(max_loras, 16)

    def __post_init__(self) -> None:
        modules = named_dirs(self.lora_modules, "lora_modules")
        object.__setattr__(self, "lora_modules", modules)
        if modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (--enable-lora)")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK_LIMIT:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def modules(self) -> dict[str, str]:
        """The adapters served from the start, name -> directory."""
        return dict(entry.split("=", 1) for entry in self.lora_modules)

    @property
    def host_slots(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 16)


def named_dirs(entries: Any, what: str) -> tuple[str, ...]:
    """NAME=DIR entries (a string, a sequence of them, or a {name: dir} mapping) as a checked tuple of strings."""
    if isinstance(entries, str):
        entries = (entries,)
    elif isinstance(entries, Mapping):
        entries = tuple(f"{name}={path}" for name, path in entries.items())
    entries = tuple(str(e) for e in entries)
    names: set[str] = set()
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{what} entries are NAME=DIR, got {entry!r}")
        if name in names:
            raise ValueError(f"{what} names {name!r} twice")
        names.add(name)
    return entries


@dataclass(frozen=True)
class ZooConfig:
    """BlockLLM's block zoo (kvflow/model/block_zoo.py): full fine-tuned variants of the base model served
    by the same engine, each layer they did not change stored once (the base's) and run once per step for
    every request that reaches it; requests choose a variant by name (the API's `model` field)."""

    # "NAME=DIR" model directories (the offline API also takes a {name: dir} mapping).
    variant: tuple[str, ...] = ()
    # Share the KV of the leading layers a variant did not change with the base (the cache is split into
    # layer groups; kvflow/core/kv_cache_manager.py). Off: every variant's KV is its own.
    zoo_share_kv: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", named_dirs(self.variant, "variant"))

    @property
    def variants(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.variant)


KV_TRANSFER_ROLES = ("prefill", "decode")
KV_TRANSPORTS = ("tcp", "shm")
KV_TRANSFER_MODES = ("whole", "layerwise")


@dataclass(frozen=True)
class KVTransferConfig:
    """This engine as one instance of a disaggregated deployment (kvflow/disagg/).

    A prefill instance computes prompts and first tokens and serves their KV blocks to decode
    instances, which pull them into their own blocks and go on decoding. `mode` says when a
    prefill instance may send a layer: once the whole prompt is computed (DistServe), or as soon as
    that layer is (Splitwise's layer-wise streaming, which overlaps transfer with later layers).
    """

    role: str = "prefill"
    transport: str = "tcp"  # tcp: KV bytes on the socket; shm: a shared-memory segment, offsets on the socket
    mode: str = "layerwise"
    host: str = "127.0.0.1"  # where a prefill instance listens for pulls (port 0: any free port)
    port: int = 0
    # A transfer that makes no progress for this long is given up: the prefill side frees its
    # blocks, the decode side frees its own and computes the prompt itself.
    timeout_s: float = 30.0
    # Testing and what-if benchmarks: seconds each layer's send is delayed, as if over a slow link.
    layer_send_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in KV_TRANSFER_ROLES:
            raise ValueError(f"kv transfer role must be one of {', '.join(KV_TRANSFER_ROLES)}; got {self.role!r}")
        if self.transport not in KV_TRANSPORTS:
            raise ValueError(f"kv transport must be one of {', '.join(KV_TRANSPORTS)}; got {self.transport!r}")
        if self.mode not in KV_TRANSFER_MODES:
            raise ValueError(f"kv transfer mode must be one of {', '.join(KV_TRANSFER_MODES)}; got {self.mode!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"kv transfer port must be in [0, 65535], got {self.port}")
        if self.timeout_s <= 0:
            raise ValueError(f"kv transfer timeout must be > 0 s, got {self.timeout_s}")
        if self.layer_send_delay_s < 0:
            raise ValueError(f"layer send delay must be >= 0 s, got {self.layer_send_delay_s}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, validated once."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    # Weights quantised at load; the result is `model.quantization` (which the loader reads).
    load: LoadConfig = field(default_factory=LoadConfig)
    device: str = "cpu"
    seed: int = 0
    # Set when this engine is a prefill or decode instance of a disaggregated deployment.
    kv_transfer: KVTransferConfig | None = None
    # CPU cores the engine-core process is pinned to (and sizes its thread pool by); None = all.
    cpu_cores: tuple[int, ...] | None = None
    # Threads of the engine core's CPU pool when not pinned (a Ray actor's CPU share); None = torch's default.
    num_threads: int | None = None
    # JSON lines, one per engine-core step: its wall time and what it computed (`kvflow profile --serve`).
    step_log: str | None = None

    def __post_init__(self) -> None:
        requested = self.load.quantization_config()
        if requested is not None:
            object.__setattr__(self, "model", self.model.with_quantization(requested))
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not self.scheduler.enable_chunked_prefill and (
            self.scheduler.max_num_batched_tokens < self.model.max_model_len
        ):
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len "
                f"({self.model.max_model_len}) when chunked prefill is disabled, "
                f"got {self.scheduler.max_num_batched_tokens}"
            )
        if self.scheduler.batch_policy == "prefix-tree" and not self.cache.enable_prefix_caching:
            raise ValueError("batch_policy prefix-tree shares each group's prefix through the prefix cache: "
                             "enable_prefix_caching must be on")
        if self.kv_transfer is not None and self.cache.kv_offload:
            raise ValueError("a prefill or decode instance cannot have KV offload tiers yet (an engine has one KV "
                             "connector)")
        if self.model.longconv is not None and self.cache.kv_cache_dtype not in ("auto", *_DENSE_KV):
            raise ValueError(f"kv_cache_dtype={self.cache.kv_cache_dtype}: a long-conv model keeps its conv inputs "
                             f"as computed; use auto or one of {', '.join(_DENSE_KV)}")
        if self.kv_policy_allowed() is not None and self.cache.kv_policy != "none":
            raise ValueError(f"kv_policy={self.cache.kv_policy}: {self.kv_policy_allowed()}")
        if self.speculative.enabled:
            # A verification step writes KV for every proposal and keeps the accepted ones; KIVI would
            # quantise groups holding rejected tokens, and a KV policy would keep or score them.
            if self.cache.kv_cache_dtype in KIVI_CACHE_DTYPES:
                raise ValueError(f"speculative decoding does not support kv_cache_dtype {self.cache.kv_cache_dtype} "
                                 "yet: use int8 or fp8_e4m3")
            if self.cache.kv_policy != "none":
                raise ValueError(f"speculative decoding does not support kv_policy={self.cache.kv_policy} yet")
        if (self.lora.enable_lora or self.zoo.variant) and self.model.longconv is not None:
            raise ValueError("LoRA adapters and model variants are served for attention models; "
                             f"{self.model.architecture} has no q/k/v/o projections to adapt")
        if self.zoo.variant and self.kv_transfer is not None:
            raise ValueError("model variants (--variant) are not served by disaggregated prefill/decode instances yet")
        if self.lora.enable_lora and self.kv_transfer is not None:
            raise ValueError("LoRA adapters are not served by disaggregated prefill/decode instances yet "
                             "(the prefill instance would need each adapter too): serve them colocated")

    def kv_policy_allowed(self) -> str | None:
        """Why this engine cannot run a KV policy (None: it can). A policy drops or skips KV, so it needs
        attention that depends only on which keys are read (no sliding-window layers, whose windows
        count positions in the cache) and KV that stays on this instance."""
        if any(w is not None for w in self.model.sliding_windows):
            return "the model has sliding-window layers, which KV policies do not support"
        if self.model.longconv is not None:
            return "a long-conv model convolves every earlier token's input, so none may be dropped or skipped"
        if self.kv_transfer is not None:
            return "KV policies do not support disaggregated prefill/decode instances"
        if self.cache.kv_offload:
            return "KV policies do not support KV offload tiers (a policy changes what a block holds)"
        return None

    @classmethod
    def create(
        cls,
        model: str | os.PathLike,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> EngineConfig:
        """Build from flat keyword arguments (the offline API and CLI use this)."""
        parts: dict[type, dict[str, Any]] = {CacheConfig: {}, SchedulerConfig: {}, RunnerConfig: {},
                                             SpeculativeConfig: {}, LoadConfig: {}, LoRAConfig: {}, ZooConfig: {}}
        if "max_num_seqs" in kwargs and "admission" not in kwargs:
            kwargs = {**kwargs, "admission": "seqs"}  # a limit the user sets is a limit, prefix tree or not
        for key, value in kwargs.items():
            for part in parts:
                if key in {f.name for f in fields(part)}:
                    parts[part][key] = value
                    break
            else:
                allowed = sorted(
                    {f.name for p in parts for f in fields(p)}
                    | {"dtype", "max_model_len", "device", "seed", "tokenizer"}
                )
                raise ValueError(f"unknown engine argument {key!r}; allowed: {', '.join(allowed)}")
        return cls(
            model=ModelConfig.from_pretrained(model, dtype=dtype, max_model_len=max_model_len, tokenizer=tokenizer),
            cache=CacheConfig(**parts[CacheConfig]),
            scheduler=SchedulerConfig(**parts[SchedulerConfig]),
            runner=RunnerConfig(**parts[RunnerConfig]),
            speculative=SpeculativeConfig(**parts[SpeculativeConfig]),
            load=LoadConfig(**parts[LoadConfig]),
            lora=LoRAConfig(**parts[LoRAConfig]),
            zoo=ZooConfig(**parts[ZooConfig]),
            device=device,
            seed=seed,
        )
