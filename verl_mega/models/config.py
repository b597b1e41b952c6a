"""Model configuration of the Llama / Qwen2 / Qwen3 decoder family, read from and written to HF configs.

`ModelConfig` is the one description of the architecture that the decoder, the loaders and the
engines share. `ModelConfig.from_hf` accepts a `config.json` path, a directory holding one, or the
dict; both the transformers-4 form (`rope_theta` + `rope_scaling`) and the transformers-5 form
(`rope_parameters`) are understood. `to_hf_dict()` writes the transformers-5 form (with `rope_theta`
kept at top level for older readers) and keeps the keys of the source config it does not model
(token ids, generation defaults, ...).

Vocabulary padding: TP shards the vocabulary, so it is padded to a multiple of lcm(128, tp). For
every tp dividing 128 the padded size is the same, so shards of different TP sizes of one model
concatenate consistently (HybridEngine resharding). Padded rows are zero; `logits()` slices them off
and the log-prob kernel masks them using `vocab_size` (the true size).

Simplifications: only SwiGLU MLP, RMSNorm, full (non-sliding) attention; RoPE types default,
llama3 and linear.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
VOCAB_PAD_MULTIPLE = 128
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# HF keys that ModelConfig models itself (everything else is carried through `hf_extra`).
_MODELLED_HF_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "hidden_act", "architectures", "layer_types",
}


@dataclass
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Qwen3 decoder (the fields of a HF config we implement)."""

    vocab_size: int  # true vocabulary size (rows of the HF embedding); see padded_vocab_size()
    hidden_size: int  # model width H
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # number of decoder layers
    num_heads: int  # attention (query) heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # width of one head
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # None, {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings} or {"rope_type": "linear", "factor"}
    max_position_embeddings: int = 2048  # longest position the model was trained for
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    attention_bias: bool = False  # q/k/v projections have a bias (always True for Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    model_type: str = "llama"  # "llama" | "qwen2" | "qwen3"
    hf_extra: dict = field(default_factory=dict, repr=False)  # unmodelled keys of the source HF config, written back by to_hf_dict

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    # ------------------------------------------------------------------ parallel sizes
    def check_tp(self, tp: int) -> None:
        """Raise ValueError if the heads cannot be split over `tp` ranks."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if self.num_heads % tp:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by tensor_parallel_size={tp}")
        if self.num_kv_heads % tp:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} is not divisible by tensor_parallel_size={tp}")
        if self.intermediate_size % tp:
            raise ValueError(f"intermediate_size={self.intermediate_size} is not divisible by tensor_parallel_size={tp}")

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rows held by the model: vocab_size rounded up to a multiple of lcm(128, tp)."""
        multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
        return -(-self.vocab_size // multiple) * multiple

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Build from a HF config dict, a `config.json` path or a directory containing one."""
        hf = _read_hf_config(source) if not isinstance(source, dict) else dict(source)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True (sliding-window attention) is not supported")
        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(hf)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3", model_type=model_type,
            hf_extra={k: v for k, v in hf.items() if k not in _MODELLED_HF_KEYS},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` content (transformers-5 form) that transformers loads into the same model."""
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("a qwen2 model always has q/k/v bias in transformers; set attention_bias=True")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} cannot be expressed as HF model_type {self.model_type!r}")
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        out = dict(self.hf_extra)
        out.update({
            "architectures": [_ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "rope_parameters": rope, "rope_theta": self.rope_theta,
        })
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (without hf_extra), e.g. for logging."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_extra"}


def _read_hf_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"HF config not found: {path} does not exist")
    with open(path) as f:
        return json.load(f)


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the transformers-5 `rope_parameters` or the 4.x keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    return float(theta), scaling or None


def _normalise_rope_scaling(scaling: dict | None) -> dict | None:
    """None for plain RoPE; otherwise a dict with "rope_type" (the 4.x key "type" is accepted)."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type", "default")
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return None
    required = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing {missing}")
    return scaling
