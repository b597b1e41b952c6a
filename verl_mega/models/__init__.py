"""verl_mega.models: Llama/Qwen2/Qwen3 (+ Qwen2.5-VL) on megatron-core TP layers, pipeline stages, HF I/O, tokenizers.

    model = build_stage(ModelConfig.from_hf(path), layout, init_seed=None)   # this rank's DecoderModel stage
    load_hf_weights(model, path)

The actor handle that loads a HF directory and generates (`get_actor_model`, `HFActor`) is an
application object above the rollout service: `from verl_mega.rollout import get_actor_model, HFActor`.
This package imports nothing above {parallel, kernels}.
"""

from verl_mega.models.config import ModelConfig, VisionConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.models.hf_io import load_hf_weights, save_hf
from verl_mega.models.masks import build_attention_mask, position_ids_from_mask
from verl_mega.models.mrope import decode_position_ids, mrope_position_ids
from verl_mega.models.parallelize import build_stage, stage_layer_range
from verl_mega.models.tokenizer import load_tokenizer
from verl_mega.models.vision import VisionTower, image_token_counts

__all__ = [
    "DecoderModel", "ModelConfig", "VisionConfig", "VisionTower", "build_attention_mask", "build_stage",
    "decode_position_ids", "image_token_counts", "load_hf_weights", "load_tokenizer", "mrope_position_ids",
    "position_ids_from_mask", "save_hf", "stage_layer_range",
]
