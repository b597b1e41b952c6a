"""Build tiny random Hugging Face models (Llama / Qwen2 / Qwen3) plus a tokenizer in a local directory.

Tests, demos and benchmarks need a complete offline HF directory (config.json, model.safetensors,
tokenizer files with a chat template) without downloads. `make_tiny_hf_model` creates one with
transformers' own classes (`save_pretrained`), so loading it exercises the real HF format.

The tokenizer is character-level (a `tokenizers` WordLevel model over printable ASCII with each
character its own word, `Fuse` decoder): lossless for ASCII text, 103 tokens, special tokens
`<pad>`, `<s>`, `</s>`, `<unk>`, `<|im_start|>`, `<|im_end|>` (eos) and a ChatML-style chat template.

Weights are re-drawn with larger scales than HF's default init (std 0.02 would make every logit
~0 and parity tests meaningless): embeddings N(0, 1), linear weights N(0, 1/fan_in), biases and
norm weights perturbed around 0 / 1.
"""

from __future__ import annotations

import os
import string

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]  # letters, digits, punctuation, space, \t, \n


def make_tiny_tokenizer(out_dir: str | None = None):
    """A character-level `PreTrainedTokenizerFast` (eos `<|im_end|>`, pad `<pad>`, bos `<s>`, chat template);
    saved to `out_dir` if given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one word per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["</s>", "<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tiny_hf_config(arch: str = "llama", *, vocab_size: int = 128, hidden_size: int = 32, intermediate_size: int = 64,
                   num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                   tie: bool = False, rope_scaling: dict | None = None, rope_theta: float = 10000.0,
                   max_position_embeddings: int = 256, token_ids: dict | None = None):
    """A transformers config object (LlamaConfig / Qwen2Config / Qwen3Config) with tiny sizes."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"arch {arch!r} is not one of {sorted(classes)}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
              max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
              **(token_ids or {}))
    if head_dim is not None and arch != "qwen2":
        kw["head_dim"] = head_dim
    return classes[arch](**kw)


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw all parameters at O(1) activation scale (see module docstring): RMSNorm weights 1 + N(0, 0.1),
    biases N(0, 0.1), embeddings N(0, 1), other weights N(0, 1/fan_in) (fan_in = elements per output row, so a
    vision tower's Conv3d too)."""
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    for name, p in model.named_parameters():
        if id(p) in norms:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / (p.numel() // p.shape[0]) ** 0.5)


def make_tiny_hf_model(out_dir: str, arch: str = "llama", *, vocab_size: int = 128, tie: bool = False,
                       rope_scaling: dict | None = None, num_kv_heads: int = 2, seed: int = 0,
                       with_tokenizer: bool = True, dtype: torch.dtype = torch.float32, **config_kw) -> str:
    """Write a random `{Llama,Qwen2,Qwen3}ForCausalLM` (+ tokenizer) to `out_dir`; returns `out_dir`.

    Defaults: hidden 32, intermediate 64, 2 layers, 4 heads / 2 kv heads. `config_kw` goes to
    `tiny_hf_config` (hidden_size, num_layers, num_heads, head_dim, intermediate_size, ...).
    `vocab_size` must cover the tokenizer (>= 103 tokens) when `with_tokenizer`.
    Example llama3 scaling: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}.
    """
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    token_ids = {}
    if with_tokenizer:
        tok = make_tiny_tokenizer(out_dir)
        if vocab_size < len(tok):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {len(tok)} tokens")
        token_ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tiny_hf_config(arch, vocab_size=vocab_size, tie=tie, rope_scaling=rope_scaling,
                            num_kv_heads=num_kv_heads, token_ids=token_ids, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, seed)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir
