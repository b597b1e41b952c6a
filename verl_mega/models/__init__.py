"""verl_mega.models: Llama/Qwen2/Qwen3 decoder on megatron-core TP layers, pipeline stages, HF I/O, tokenizers.

    actor = get_actor_model("path/to/hf_dir", torch_dtype=torch.bfloat16, tensor_parallel_size=2)
    actor.model      # this rank's DecoderModel stage
    actor.logits(input_ids, attention_mask)   # [B, S, vocab] fp32 on every rank
"""

from verl_mega.models.actor import HFActor, get_actor_model
from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel, build_attention_mask, position_ids_from_mask
from verl_mega.models.hf_io import load_hf_weights, save_hf
from verl_mega.models.parallelize import build_stage, stage_layer_range
from verl_mega.models.tokenizer import load_tokenizer

__all__ = [
    "DecoderModel", "HFActor", "ModelConfig", "build_attention_mask", "build_stage", "get_actor_model",
    "load_hf_weights", "load_tokenizer", "position_ids_from_mask", "save_hf", "stage_layer_range",
]
