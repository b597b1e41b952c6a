"""`RewardModel`: a trained reward model (HF `*ForSequenceClassification`, one label) as a batched reward.

    rm = RewardModel("path/to/rm_dir", tensor_parallel_size=2)          # or layout=actor.layout
    trainer = PPOTrainer(actor, reward_fn=rm)                            # scored as a batch, every rank
    trainer = PPOTrainer(actor, reward_fn=FallbackReward(RuleBasedReward(), rm))

What it computes: for each (sample, response) the text the reward model was trained on, i.e. the
prompt's chat messages plus the response as the assistant turn rendered with the *reward model's*
tokenizer and chat template (responses are re-tokenised: the actor's tokenizer may differ), then the
score head's output at the last real token (Bradley-Terry scalar), as transformers'
`LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` compute it.

How: the decoder plus a replicated score head [1, H] loaded onto a (tp, pp, dp) layout by
`get_actor_model(..., score_head=True)` (each rank reads only its slices); rows sorted by length and
cut into micro-batches of at most `max_tokens_per_batch` padded tokens, left-padded, run through the
stages (`HFActor.scores`). `offload=True` keeps the weights in CPU memory between calls and moves
them to the compute device only for `score_batch` (`WeightOffload`: a pinned CPU copy made once,
nothing copied back since the weights are frozen), leaving the device memory to training.

Collective: every rank of the model's model-parallel (tp x pp) group calls `score_batch` with the
same rows (checked: a mismatch is a ValueError, not a hang). Under `PPOTrainer` that holds when the
reward model uses the actor's layout (the default of `trainer.reward: model:PATH`) or any layout whose
model-parallel groups lie inside the actor's.

Simplifications: no sequence packing (padding inside a micro-batch); no truncation (a text longer
than the model's context is scored as is).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from verl_mega.models.hf_io import weight_map
from verl_mega.rollout.actor import HFActor, get_actor_model
from verl_mega.parallel.dist import device as comm_device
from verl_mega.rewards.base import MAX_ERROR_MESSAGES, RewardResult
from verl_mega.rewards.batched import BatchedReward

DEFAULT_MAX_TOKENS_PER_BATCH = 8192  # padded tokens per reward-model forward


class WeightOffload:
    """Frozen weights kept in CPU memory (pinned when CUDA is available) between uses.

    Built once: every parameter and buffer of `module` gets a CPU copy and is pointed at it. Inside
    `with offload.on(device):` they are copied to `device`; afterwards they point at the CPU copies
    again and the device copies are freed. Nothing is copied back: the weights are frozen."""

    def __init__(self, module: torch.nn.Module):
        pin = torch.cuda.is_available()
        self.pairs = []
        for t in [*module.parameters(), *module.buffers()]:
            cpu = t.detach().to("cpu", copy=True)
            self.pairs.append((t, cpu.pin_memory() if pin else cpu))
            t.data = self.pairs[-1][1]

    @contextmanager
    def on(self, device: torch.device):
        """The weights on `device` for the block, back in CPU memory after it."""
        for t, cpu in self.pairs:
            t.data = cpu.to(device, non_blocking=True)
        try:
            yield
        finally:
            for t, cpu in self.pairs:
                t.data = cpu


def on_device(offload: WeightOffload | None, device: torch.device):
    """`offload.on(device)`, or a no-op context when the weights stay on the device."""
    return offload.on(device) if offload is not None else nullcontext()


def check_same_rows(rows, group, what: str) -> None:
    """ValueError on every rank when the ranks of `group` hold different `rows` (a small all-gather of
    a digest). Collective models need the same rows on all ranks of a model-parallel group."""
    if group is None or dist.get_world_size(group) == 1:
        return
    digest = hashlib.sha1(repr(rows).encode()).hexdigest()
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        raise ValueError(f"{what}: the ranks of the model-parallel group passed different rows; every rank of a "
                         f"tp x pp group must pass the same samples (use the actor's layout, or one whose "
                         f"model-parallel groups lie inside the actor's)")


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `max_tokens` padded tokens (rows x longest row).

    Rows are taken longest first, so each batch pads to its first row; a row longer than the budget
    forms a batch of its own. Deterministic (ties keep index order), so all ranks cut alike."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) with every row right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[b, width - len(r):] = 1
    return ids, mask


def prompt_messages(sample: dict) -> list[dict] | str | None:
    """The prompt of a dataset item / trainer sample: chat messages, a plain string, or None."""
    prompt = sample.get("messages") or sample.get("prompt")
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    if isinstance(prompt, str):
        return prompt
    return None


def _num_labels(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 1))


def check_reward_checkpoint(path: str) -> None:
    """ValueError when the HF directory `path` is not a one-label reward model: its config.json gives several
    labels, or its weights hold no score head (`score.weight`: a causal LM, which the loader would report as a
    missing tensor). A directory without config.json or weights passes (the loader names what is missing)."""
    if os.path.isfile(os.path.join(path, "config.json")) and _num_labels(path) != 1:
        raise ValueError(f"reward model {path} has {_num_labels(path)} labels; a reward model has one "
                         f"(a *ForSequenceClassification checkpoint with num_labels=1)")
    try:
        names = weight_map(path)
    except FileNotFoundError:
        return
    if not any(name == "score.weight" or name.endswith(".score.weight") for name in names):
        raise ValueError(f"reward model {path} has no score head (no score.weight tensor in its weights): a "
                         f"reward model is a *ForSequenceClassification checkpoint with one label. A causal LM "
                         f"can judge instead: LLMJudgerReward({path!r}) (trainer.reward=judge:{path})")


class RewardModel(BatchedReward):
    """A sharded sequence-classification reward model scoring (prompt, response) batches.

    Args:
        model: a HF `*ForSequenceClassification` directory (one label) or an `HFActor` loaded with
            score_head=True.
        torch_dtype, tensor_parallel_size, pipeline_parallel_size, layout: as `get_actor_model`
            (a path only; `layout` wins over the sizes).
        tokenizer: the reward model's tokenizer (default: the one in its directory).
        max_tokens_per_batch: padded tokens per forward (rows x longest row).
        offload: keep the weights in CPU memory between calls.
    """

    collective = True

    def __init__(self, model: str | os.PathLike | HFActor, *, torch_dtype=torch.float32, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, layout=None, tokenizer=None,
                 max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH, offload: bool = False):
        if max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
        if not isinstance(model, HFActor):
            path = os.fspath(model)
            check_reward_checkpoint(path)
            model = get_actor_model(path, torch_dtype=torch_dtype, tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size, layout=layout, score_head=True,
                                    device="cpu" if offload else None)
        elif not model.model.is_score_model:
            raise ValueError("RewardModel: the HFActor has no score head (load it with score_head=True)")
        self.actor, self.layout = model, model.layout
        self.actor.model.requires_grad_(False).eval()
        self.device = comm_device()  # where it computes (after get_actor_model initialised torch.distributed)
        self.offload = WeightOffload(model.model) if offload else None
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"reward model {model.path} has no tokenizer: pass tokenizer= "
                             f"(responses are re-tokenised)")
        self.max_tokens_per_batch = max_tokens_per_batch
        tok = self.tokenizer
        self.pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    def encode(self, sample: dict, response: str) -> list[int]:
        """Reward-model token ids of one (prompt, response): the prompt's chat messages + the response as
        the assistant turn through the RM's chat template; a plain-string prompt is the user turn (or,
        without a template, prompt text + response). ValueError for a sample without a prompt."""
        tok = self.tokenizer
        prompt = prompt_messages(sample)
        if prompt is None:
            raise ValueError(f"RewardModel needs the prompt text: sample has neither chat messages nor a string "
                             f"under 'prompt' / 'messages' (keys: {sorted(sample)})")
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))
        if not isinstance(prompt, str):
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
        return list(tok.encode(prompt + response))

    def score_batch(self, samples, responses, *, timeout_s=None) -> RewardResult:
        """Scores [B] (fp32) of the batch; a non-finite score counts as a failure and scores 0.
        `timeout_s` is ignored (a collective forward cannot be abandoned)."""
        if len(samples) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(samples)} samples")
        ids = [self.encode(s, r) for s, r in zip(samples, responses)]
        check_same_rows(ids, self.layout.mp_group if self.layout.tp * self.layout.pp > 1 else None,
                        "RewardModel.score_batch")
        limit = self.actor.config.max_position_embeddings  # beyond it the model reads garbage positions
        scores = torch.zeros(len(ids), dtype=torch.float32)
        fits = [i for i, x in enumerate(ids) if len(x) <= limit]
        too_long = [i for i, x in enumerate(ids) if len(x) > limit]
        with on_device(self.offload, self.device):
            for rows in token_budget_batches([len(ids[i]) for i in fits], self.max_tokens_per_batch):
                rows = [fits[j] for j in rows]
                input_ids, mask = left_pad([ids[i] for i in rows], self.pad_id)
                scores[rows] = self.actor.scores(input_ids, mask).float().cpu()
        bad = ~torch.isfinite(scores)
        errors = ([f"sample {i}: {len(ids[i])} tokens exceed the reward model's max_position_embeddings={limit}"
                   for i in too_long] + [f"sample {i}: reward model score is not finite"
                                         for i in bad.nonzero().flatten().tolist()])[:MAX_ERROR_MESSAGES]
        return RewardResult(scores.masked_fill(bad, 0.0), failures=int(bad.sum()) + len(too_long), errors=errors,
                            extras=[{} for _ in ids])

    def __repr__(self) -> str:
        return f"RewardModel({self.actor.path!r}, {self.layout}, offload={self.offload is not None})"
