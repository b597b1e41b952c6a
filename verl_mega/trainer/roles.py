"""The models of an RL run besides the actor: a frozen reference policy and a critic, on the actor's layout.

- `FrozenModel`: a stage that is only ever run forward (the reference policy). It has the
  `forward_only(microbatches, output_fn)` of `TrainEngine` (same pipeline schedule) but no
  optimizer, gradients or fp32 master copy. With `offload=True` its decoder layers live in host
  memory (pinned) and stream to the device one layer at a time during the pass (`LayerStreamer`);
  the embedding, final norm and head stay resident (the log-prob kernel reads the head weight
  outside the model's forward).
- `build_reference`: a frozen copy of the actor (same stage, same weights, requires_grad off), or a
  separate HF directory.
- `build_critic`: the actor's HF directory (or another) loaded with a value head, wrapped in its own
  `TrainEngine` (verl initialises the critic from the actor's weights too; its optimizer offloaded
  like the actor's when asked). A value head that the
  directory does not carry is new: `init_value_head` sets it to N(0, std^2) weights and a zero bias
  (std 0 = zeros, so V = 0 at the start and the first advantages are the plain returns rather than
  returns minus noise; the trunk still gets gradients from the second step on).

All are collective over the layout (every rank builds its own stage).
"""

from __future__ import annotations

from typing import Callable

import torch

from verl_mega.models import build_stage
from verl_mega.rollout.actor import get_actor_model
from verl_mega.parallel import pipeline
from verl_mega.parallel.offload import LayerStreamer
from verl_mega.parallel.p2p import PipeComm
from verl_mega.trainer.engine import TrainEngine, default_forward_step
from verl_mega.trainer.optim import OptimConfig


class FrozenModel:
    """Forward-only runner of one pipeline stage (no optimizer); `.model` is the stage (with a
    `layers` ModuleList when `offload`: those stream from the host, see module docstring)."""

    def __init__(self, model: torch.nn.Module, layout, *, offload: bool = False):
        self.model = model.requires_grad_(False).eval()
        self.layout = layout
        self.device = next(model.parameters()).device
        self.comm = PipeComm(layout, self.device) if layout.pp > 1 else None
        self.streamer = LayerStreamer(model.layers, self.device) if offload else None

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], output_fn: Callable, *,
                     forward_step: Callable | None = None) -> list[dict[str, torch.Tensor]]:
        """As `TrainEngine.forward_only`: per-micro-batch dicts of `output_fn(output, mb)` on every rank."""
        return pipeline.forward_only(self.model, microbatches, forward_step=forward_step or default_forward_step,
                                     output_fn=output_fn, comm=self.comm)


def build_reference(actor, path: str | None = None, *, offload: bool = False) -> FrozenModel:
    """A frozen reference policy: `path`'s weights if given, else a copy of the actor's current weights.
    offload: its layers live on the host and stream to the device during the pass."""
    if path is not None:
        ref = get_actor_model(path, torch_dtype=actor.dtype, layout=actor.layout)
        return FrozenModel(ref.model, actor.layout, offload=offload)
    model = build_stage(actor.config, actor.layout, params_dtype=actor.dtype, device=actor.device, init_seed=None)
    model.load_state_dict(actor.model.state_dict())
    return FrozenModel(model, actor.layout, offload=offload)


def build_critic(actor, optim_config: OptimConfig, path: str | None = None, *,
                 value_head_std: float | None = 0.0, offload_optimizer: bool = False) -> TrainEngine:
    """A critic `TrainEngine`: `path` (default the actor's HF directory) loaded with a value head.

    `value_head_std`: re-initialise the value head with `init_value_head` (None keeps what was loaded:
    use it for a trained critic directory). `offload_optimizer` as in `TrainEngine`."""
    critic = get_actor_model(path or actor.path, torch_dtype=actor.dtype, layout=actor.layout, value_head=True)
    if value_head_std is not None:
        init_value_head(critic.model, value_head_std)
    return TrainEngine(critic.model, actor.layout, optim_config, param_dtype=actor.dtype,
                       offload_optimizer=offload_optimizer)


@torch.no_grad()
def init_value_head(model: torch.nn.Module, std: float) -> None:
    """Value head weight [1, H] ~ N(0, std^2) (std 0: zeros), bias 0; a no-op on stages without the head.
    Drawn from a fixed-seed CPU generator so every rank of a layout gets the same head."""
    head = getattr(model, "value_head", None)
    if head is None:
        return
    gen = torch.Generator().manual_seed(0)
    head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
    if head.bias is not None:
        head.bias.zero_()
