"""`LLMJudgerReward`: a frozen causal LM reads (prompt, response, ground truth) and writes a verdict,
which a documented parser maps to a score.

    judge = LLMJudgerReward(model="path/to/judge_dir", parse="0-10", max_new_tokens=32)
    trainer = PPOTrainer(actor, reward_fn=judge)          # swaps in for RuleBasedReward()

What it computes: for each sample the judge prompt `prompt_template.format(prompt=..., response=...,
ground_truth=...)` (ground truth: the sample's `ground_truth` or `reward_model.ground_truth`, else
"(none)"), sent as one user turn through the judge's chat template (`use_chat_template`), answered
greedily (`temperature=0`) by `verl_mega.rollout.generate` with at most `max_new_tokens` tokens. The
verdict text is parsed:
  - "0-10" (default): the first number after the word "score" (`Score: 7`, `score = 7.5`), else the
    first number in the verdict, must lie in [0, 10] and is divided by 10;
  - "0-1": the same, a number in [0, 1] taken as is;
  - "yes/no": the first standalone word "yes" (1.0) or "no" (0.0), case-insensitive;
  - or any callable `parse(verdict) -> float | None`.
An unparsable verdict (no match, out of range, None, or a parser exception) scores 0 and counts as a
reward failure (`reward_failures` in the trainer's metrics), as does a judge prompt whose tokens plus
`max_new_tokens` exceed the judge's `max_position_embeddings` (not generated: its verdict is None); every
verdict is kept in the result's extras (`{"verdict": text}`).

How: the judge is its own frozen model on its own inference layout (tp = `tensor_parallel_size`, one
pipeline stage, dp = the rest of the world): no optimizer, no HybridEngine resharding. Collective
over its tensor-parallel group, whose ranks must pass the same rows (checked). `offload=True` keeps
its weights in CPU memory between calls and frees its KV cache after each call.

Simplification: one verdict per response (no self-consistency voting, no pairwise comparison).
"""

from __future__ import annotations

import math
import os
import re
import string
from collections.abc import Callable
from functools import partial

import torch

from verl_mega.rollout.actor import HFActor, get_actor_model
from verl_mega.parallel.dist import device as comm_device
from verl_mega.rewards.base import MAX_ERROR_MESSAGES, RewardFunction, RewardResult
from verl_mega.rewards.batched import BatchedReward
from verl_mega.model_rewards.reward_model import WeightOffload, check_same_rows, on_device, prompt_messages
from verl_mega.rollout import encode_prompts, generate, release

DEFAULT_PROMPT_TEMPLATE = (
    "Judge the response to the question below.\n\n"
    "Question:\n{prompt}\n\n"
    "Reference answer:\n{ground_truth}\n\n"
    "Response:\n{response}\n\n"
    "Rate the response from 0 (wrong or useless) to 10 (correct and complete). Reply with 'Score: N'."
)
NO_GROUND_TRUTH = "(none)"
TEMPLATE_FIELDS = ("prompt", "response", "ground_truth")
DEFAULT_MAX_NEW_TOKENS = 32

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_AFTER_SCORE = re.compile(r"score\W{0,3}(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_score(verdict: str, max_score: float = 10.0) -> float | None:
    """Score in [0, 1] from a verdict: the first number after "score" (else the first number), divided
    by `max_score`; None when there is no number or it lies outside [0, max_score]."""
    match = _AFTER_SCORE.search(verdict) or _ANY_NUMBER.search(verdict)
    if match is None:
        return None
    value = float(match.group(1) if match.re is _AFTER_SCORE else match.group(0))
    return value / max_score if 0.0 <= value <= max_score else None


def parse_yes_no(verdict: str) -> float | None:
    """1.0 for a verdict whose first standalone yes/no word is "yes", 0.0 for "no", else None."""
    match = _YES_NO.search(verdict)
    return None if match is None else float(match.group(1).lower() == "yes")


PARSERS: dict[str, Callable[[str], float | None]] = {
    "0-10": partial(parse_score, max_score=10.0), "0-1": partial(parse_score, max_score=1.0), "yes/no": parse_yes_no}


def check_template(template) -> None:
    """ValueError unless `template` is a callable or a format string with {response} and only the allowed fields."""
    if callable(template):
        return
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a format string or a callable, got {type(template).__name__}")
    braces = "literal braces are written {{ and }}"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # an unclosed or stray brace
        raise ValueError(f"prompt_template is not a format string ({e}); {braces}") from None
    unknown = fields - set(TEMPLATE_FIELDS)
    if unknown:
        hint = "" if all(name.isidentifier() for name in unknown) else f" ({braces})"
        raise ValueError(f"prompt_template has unknown fields {sorted(unknown)}; allowed: {list(TEMPLATE_FIELDS)}{hint}")
    if "response" not in fields:
        raise ValueError("prompt_template has no {response} field: the judge would not see the response")


def prompt_text(sample: dict) -> str:
    """The prompt as plain text: a string prompt as is; chat messages as their content (one message) or
    `role: content` lines. ValueError when the sample has no prompt."""
    prompt = prompt_messages(sample)
    if prompt is None:
        raise ValueError(f"the judge needs the prompt text: sample has neither chat messages nor a string under "
                         f"'prompt' / 'messages' (keys: {sorted(sample)})")
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class LLMJudgerReward(BatchedReward):
    """A frozen causal LM judging each response (see the module docstring for prompt and parsers).

    Args:
        model: a HF causal-LM directory or a loaded `HFActor` (pp = 1).
        prompt_template: format string with {prompt}, {response} and optionally {ground_truth}, or a
            callable(prompt=..., response=..., ground_truth=...) -> str.
        parse: "0-10", "0-1", "yes/no" or a callable(verdict) -> float | None.
        max_new_tokens: verdict length limit.
        torch_dtype, tensor_parallel_size, layout: how to load a path (`layout` wins; its pp must be 1).
        use_chat_template: send the judge prompt as a user turn through the judge's chat template
            (when its tokenizer has one); False: as plain text.
        offload: keep the weights in CPU memory between calls.
        max_batch: most sequences decoded together (default: all rows, up to 256).
    """

    collective = True

    def __init__(self, model: str | os.PathLike | HFActor, prompt_template: str | Callable = DEFAULT_PROMPT_TEMPLATE,
                 parse: str | Callable[[str], float | None] = "0-10", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
                 torch_dtype=torch.float32, tensor_parallel_size: int = 1, layout=None, use_chat_template: bool = True,
                 offload: bool = False, max_batch: int | None = None):
        check_template(prompt_template)
        if isinstance(parse, str) and parse not in PARSERS:
            raise ValueError(f"parse {parse!r} is not one of {sorted(PARSERS)} (or pass a callable)")
        if not callable(parse) and not isinstance(parse, str):
            raise ValueError(f"parse must be a parser name or a callable, got {type(parse).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if layout is not None and layout.pp != 1:
            raise ValueError(f"the judge runs on one pipeline stage: layout has pp={layout.pp} (shard it with tp)")
        if not isinstance(model, HFActor):
            model = get_actor_model(model, torch_dtype=torch_dtype, tensor_parallel_size=tensor_parallel_size,
                                    layout=layout, device="cpu" if offload else None)
        if model.layout.pp != 1:
            raise ValueError(f"the judge runs on one pipeline stage: its layout has pp={model.layout.pp}")
        if model.model.is_value_model:
            raise ValueError("the judge must be a causal LM (loaded without value_head / score_head)")
        if model.tokenizer is None:  # found now, not at the first reward call after a rollout
            raise ValueError(f"judge {model.path} has no tokenizer (tokenizer.json / tokenizer.model): it reads "
                             f"each prompt and response as text")
        self.judge, self.layout = model, model.layout
        self.judge.model.requires_grad_(False).eval()
        self.prompt_template, self.max_new_tokens, self.max_batch = prompt_template, max_new_tokens, max_batch
        self.parse = PARSERS[parse] if isinstance(parse, str) else parse
        tok = model.tokenizer
        self.use_chat_template = bool(use_chat_template and tok is not None and getattr(tok, "chat_template", None))
        self.device = comm_device()
        self.offload = WeightOffload(model.model) if offload else None

    def judge_prompts(self, samples, responses) -> list:
        """The judge's inputs: one user-turn message list (chat template) or string per response."""
        out = []
        for sample, response in zip(samples, responses):
            truth = RewardFunction.verl_args(response, sample)["ground_truth"]
            fields = dict(prompt=prompt_text(sample), response=response,
                          ground_truth=NO_GROUND_TRUTH if truth is None else str(truth))
            tmpl = self.prompt_template
            text = tmpl(**fields) if callable(tmpl) else tmpl.format(**fields)
            out.append([{"role": "user", "content": text}] if self.use_chat_template else text)
        return out

    def _score(self, verdict: str) -> float | None:
        """The parsed score, or None when the verdict is unparsable (None, not a finite number, an exception)."""
        try:
            value = self.parse(verdict)
            return float(value) if value is not None and math.isfinite(float(value)) else None
        except (TypeError, ValueError, ArithmeticError, LookupError):  # a parser failing on one verdict
            return None

    def score_batch(self, samples, responses, *, timeout_s=None) -> RewardResult:
        """Verdicts and scores [B] of the batch; unparsable verdicts score 0 and count as failures.
        `timeout_s` is ignored (a collective generation cannot be abandoned)."""
        if len(samples) != len(responses):
            raise ValueError(f"got {len(responses)} responses but {len(samples)} samples")
        prompts = self.judge_prompts(samples, responses)
        check_same_rows(prompts, self.layout.tp_group if self.layout.tp > 1 else None, "LLMJudgerReward.score_batch")
        ids = encode_prompts(self.judge.tokenizer, prompts)
        limit = self.judge.config.max_position_embeddings  # beyond it the judge reads garbage positions
        fits = [i for i, x in enumerate(ids) if len(x) + self.max_new_tokens <= limit]
        verdicts: list[str | None] = [None] * len(ids)  # None: not judged (too long)
        if fits:
            with on_device(self.offload, self.device):
                outs = generate(self.judge, [ids[i] for i in fits], max_new_tokens=self.max_new_tokens,
                                temperature=0.0, max_batch=self.max_batch)
                if self.offload is not None:
                    release(self.judge)  # its KV cache (and CUDA graphs, which read the moved weights)
            for i, o in zip(fits, outs):
                verdicts[i] = o["response"]
        scores, errors, failures = torch.zeros(len(verdicts), dtype=torch.float32), [], 0
        for i, verdict in enumerate(verdicts):
            value = None if verdict is None else self._score(verdict)
            if value is None:
                failures += 1
                if len(errors) < MAX_ERROR_MESSAGES:
                    errors.append(f"sample {i}: judge prompt of {len(ids[i])} tokens + max_new_tokens="
                                  f"{self.max_new_tokens} exceeds the judge's max_position_embeddings={limit} (a "
                                  f"shorter prompt_template or response, or a judge with a longer context)"
                                  if verdict is None else f"sample {i}: unparsable judge verdict {verdict!r:.80}")
            else:
                scores[i] = value
        return RewardResult(scores, failures=failures, errors=errors, extras=[{"verdict": v} for v in verdicts])

    def __repr__(self) -> str:
        return f"LLMJudgerReward({self.judge.path!r}, {self.layout}, max_new_tokens={self.max_new_tokens})"
