"""verl_mega.hybrid_engine: reshard actor weights between the training layout (tp, pp, dp) and the
generation layout (tp_g, pp_g=1) with HybridFlow's micro-DP grouping (groups.py, plan.py, reshard.py).

    engine = HybridEngine(actor.model, layout, actor.config, tp_g=1)
    model = engine.to_inference()      # all layers, TP over engine.inference_layout.tp_g_group
    ...generate, splitting prompts over engine.inference_layout.micro_dp_group...
    engine.to_train()                  # drops the inference weights; training weights untouched
"""

from verl_mega.hybrid_engine.groups import InferenceLayout, inference_coords, inference_group_ranks
from verl_mega.hybrid_engine.reshard import HybridEngine, NaiveGatherEngine, ReshardStats, inference_model

__all__ = [
    "HybridEngine", "InferenceLayout", "NaiveGatherEngine", "ReshardStats", "inference_coords",
    "inference_group_ranks", "inference_model",
]
