"""Model configuration of the Llama / Qwen2 / Qwen3 decoders and Qwen2.5-VL, read from and written to HF configs.

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

Vision-language models (HF `qwen2_5_vl`): the language model's fields are those of the nested
`text_config` (a Qwen2 decoder with M-RoPE: `mrope_section`), the vision tower's those of
`vision_config` (`VisionConfig`), and the image placeholder ids sit at top level. `to_hf_dict()`
writes the nested form back (architectures `Qwen2_5_VLForConditionalGeneration`).

Simplifications: only SwiGLU MLP, RMSNorm, full (non-sliding) attention; RoPE types default,
llama3 and linear (M-RoPE for qwen2_5_vl); images only (no video) in the VLM.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_5_vl")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
VOCAB_PAD_MULTIPLE = 128
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
# HF keys that ModelConfig models itself (everything else is carried through `hf_extra`).
_MODELLED_HF_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "hidden_act", "architectures", "layer_types",
}
# top-level keys of a qwen2_5_vl config that ModelConfig models (besides text_config / vision_config)
_MODELLED_VLM_KEYS = {"model_type", "architectures", "text_config", "vision_config", "image_token_id",
                      "vision_start_token_id", "tie_word_embeddings"}
_VISION_FIELDS_HF = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes",
                     "in_channels", "hidden_act")


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower (HF `vision_config`): ViT over 3D patches, 2D RoPE, window attention
    except at `fullatt_block_indexes`, and a merger of spatial_merge_size^2 patches into one LLM token."""

    depth: int  # number of vision blocks
    hidden_size: int  # vision width
    intermediate_size: int  # vision SwiGLU inner width
    num_heads: int  # vision attention heads
    out_hidden_size: int  # merger output width (= the language model's hidden_size)
    patch_size: int = 14  # spatial patch side in pixels
    spatial_merge_size: int = 2  # m: m x m patches merge into one LLM token
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill them)
    window_size: int = 112  # window side in pixels for window-attention blocks
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks with full (per-image) attention; the others use windows
    in_channels: int = 3  # image channels
    hidden_act: str = "silu"  # vision MLP activation (only silu)
    rope_theta: float = 10000.0  # base of the vision 2D RoPE
    hf_extra: dict = field(default_factory=dict, repr=False)  # unmodelled keys of the HF vision_config

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "spatial_merge_size", "temporal_patch_size", "window_size", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VisionConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"VisionConfig: hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a "
                             f"multiple of 4 (2D RoPE splits the head dim into h and w halves)")
        if self.hidden_act != "silu":
            raise ValueError(f"VisionConfig.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(f"VisionConfig.window_size={self.window_size} is smaller than one merge unit "
                             f"(patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size} pixels)")
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"VisionConfig.fullatt_block_indexes {bad} are outside [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        """Width of one vision attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        """Build from a HF `vision_config` dict."""
        rope = hf.get("rope_parameters") or {}
        kw = {k: hf[k] for k in _VISION_FIELDS_HF if k in hf}
        if "in_chans" in hf:  # the name in checkpoints written before transformers 4.50
            kw.setdefault("in_channels", hf["in_chans"])
        skip = set(_VISION_FIELDS_HF) | {"rope_parameters", "model_type"}
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(**kw, rope_theta=float(rope.get("rope_theta", 10000.0)), hf_extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `vision_config` dict."""
        out = dict(self.hf_extra)
        out.update({k: getattr(self, k) for k in _VISION_FIELDS_HF})
        out["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        out["model_type"] = "qwen2_5_vl_vision"
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "axial"}
        return out


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
    model_type: str = "llama"  # "llama" | "qwen2" | "qwen3" | "qwen2_5_vl"
    vision: VisionConfig | None = None  # the vision tower of a VLM (qwen2_5_vl), None for a text-only model
    image_token_id: int | None = None  # VLM: id of the image placeholder token (one per merged image patch)
    vision_start_token_id: int | None = None  # VLM: id of the token that opens an image
    mrope_section: tuple[int, int, int] | None = None  # M-RoPE: frequencies (of head_dim/2) taken from the t, h, w position axes
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
        if self.mrope_section is not None:
            self.mrope_section = tuple(int(x) for x in self.mrope_section)
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(f"mrope_section {self.mrope_section} must be 3 numbers summing to head_dim/2 = "
                                 f"{self.head_dim // 2}")
        if self.model_type == "qwen2_5_vl":
            if self.vision is None or self.image_token_id is None or self.mrope_section is None:
                raise ValueError("a qwen2_5_vl ModelConfig needs vision, image_token_id and mrope_section")
            if self.vision.out_hidden_size != self.hidden_size:
                raise ValueError(f"vision out_hidden_size={self.vision.out_hidden_size} must equal the language "
                                 f"model's hidden_size={self.hidden_size}")
        elif self.vision is not None:
            raise ValueError(f"model_type {self.model_type!r} has no vision tower; a VLM is model_type 'qwen2_5_vl'")

    @property
    def is_vlm(self) -> bool:
        """True for a vision-language model (a vision tower whose image embeddings replace image tokens)."""
        return self.vision is not None

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
        if model_type == "qwen2_5_vl":
            return cls._from_hf_vlm(hf)
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

    @classmethod
    def _from_hf_vlm(cls, hf: dict) -> "ModelConfig":
        """A qwen2_5_vl config: the language model from `text_config` (M-RoPE), the tower from `vision_config`.

        Checkpoints written before transformers 4.50 (e.g. the published Qwen2.5-VL-3B) keep the language
        model's keys at top level (no text_config) and say `rope_scaling: {"type": "mrope", ...}`."""
        if "vision_config" not in hf:
            raise ValueError("a qwen2_5_vl config needs vision_config")
        text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k not in _MODELLED_VLM_KEYS})
        if "image_token_id" not in hf:
            raise ValueError("a qwen2_5_vl config needs image_token_id")
        rope_key = "rope_parameters" if text.get("rope_parameters") else "rope_scaling"
        rope = dict(text.get(rope_key) or {})
        mrope = rope.pop("mrope_section", None)
        if mrope is None:
            raise ValueError(f"qwen2_5_vl text_config.{rope_key} has no mrope_section")
        if rope.get("type") == "mrope":
            rope.pop("type")
        text[rope_key] = rope
        text["model_type"] = "qwen2"  # the language model is a Qwen2 decoder (q/k/v bias)
        base = cls.from_hf(text)
        # top level: unmodelled keys (video / vision-end ids, ...); the language model's own keys live in text_config
        extra = {k: v for k, v in hf.items() if k not in _MODELLED_VLM_KEYS and k not in _MODELLED_HF_KEYS}
        extra["text_config"] = dict(base.hf_extra)
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(base)},
                      "model_type": "qwen2_5_vl", "mrope_section": tuple(mrope),
                      "vision": VisionConfig.from_hf(hf["vision_config"]), "image_token_id": hf["image_token_id"],
                      "vision_start_token_id": hf.get("vision_start_token_id"),
                      "tie_word_embeddings": bool(hf.get("tie_word_embeddings", base.tie_word_embeddings)),
                      "hf_extra": extra})

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` content (transformers-5 form) that transformers loads into the same model."""
        if self.model_type == "qwen2_5_vl":
            return self._to_hf_dict_vlm()
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

    def _to_hf_dict_vlm(self) -> dict[str, Any]:
        extra = dict(self.hf_extra)
        text_extra = extra.pop("text_config", {})
        text = ModelConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "model_type": "qwen2",
                              "vision": None, "image_token_id": None, "vision_start_token_id": None,
                              "mrope_section": None, "hf_extra": text_extra}).to_hf_dict()
        text.pop("architectures")
        text["model_type"] = "qwen2_5_vl_text"
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": list(self.mrope_section),
                                   "type": "mrope"}
        out = extra
        out.update({"architectures": [_ARCHITECTURES["qwen2_5_vl"]], "model_type": "qwen2_5_vl",
                    "text_config": text, "vision_config": self.vision.to_hf_dict(),
                    "image_token_id": self.image_token_id, "tie_word_embeddings": self.tie_word_embeddings})
        if self.vision_start_token_id is not None:
            out["vision_start_token_id"] = self.vision_start_token_id
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (without hf_extra; the vision config as a dict), e.g. for logging."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_extra"}
        if self.vision is not None:
            out["vision"] = {f.name: getattr(self.vision, f.name) for f in fields(self.vision) if f.name != "hf_extra"}
        return out


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
