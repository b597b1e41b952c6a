"""GRPO step with model rewards: seconds per phase and the reward phase's share of the step, for a rule
reward (baseline), a 0.5B-shaped reward model (RewardModel) and a 0.5B-shaped LLM judge (LLMJudgerReward).

Run (1 GPU):   python benchmarks/reward_models.py                       # writes $OUT/reward_models.{json,md}
CPU check:     python benchmarks/reward_models.py --smoke              # tiny shapes, fp32, gloo

Models: actor, reward model and judge all have Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads /
2 kv heads, intermediate 4864, vocab 151936; `--smoke`: a tiny shape) with random bf16 weights built
on the device (no HF directory). The reward model has a score head [1, 896] instead of the LM head.
Without a real tokenizer, text is token ids joined by spaces (the trainer decodes responses that way
when the actor has no tokenizer) and `IdTokenizer` turns it back into the same ids, so the reward
model re-tokenises exactly the prompt + response tokens and the judge reads a template of
`--judge-template-tokens` filler ids around them. Random weights never emit EOS, so every response has
`--max-new-tokens` tokens and every verdict `--judge-new-tokens` tokens (the worst case). The judge's
verdict is scored by a callable parser (fraction of even ids), so no verdict is unparsable.

Rewards (`--rewards`): rule (even-id fraction of the response, no model), model, model_offload
(weights in CPU memory between reward calls), judge, judge_offload. Each builds a fresh trainer and
runs `--steps` steps; the first `--warmup` are not measured. Reported: mean seconds of the phases
(rollout = generate + reshard, reward, logprob, advantage, update), the step, and reward / step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_e2e import EOS_ID, QWEN25_05B, even_token_reward  # noqa: E402 - the shared 0.5B shape and toy reward

from verl_mega.models import ModelConfig, build_stage  # noqa: E402
from verl_mega.rollout.actor import HFActor  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.parallel.dist import device as comm_device  # noqa: E402
from verl_mega.parallel.dist import init_distributed  # noqa: E402
from verl_mega.model_rewards import LLMJudgerReward, RewardModel  # noqa: E402
from verl_mega.trainer import PPOTrainer, TrainerConfig  # noqa: E402

SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True, attention_bias=True,
             model_type="qwen2")
PHASES = ("rollout", "reward", "logprob", "advantage", "update")
REWARDS = ("rule", "model", "model_offload", "judge", "judge_offload")


class IdTokenizer:
    """Text of space-separated token ids <-> the ids (the stand-in tokenizer of random-weight models)."""

    chat_template = None
    eos_token_id = EOS_ID
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def even_fraction_verdict(verdict: str) -> float:
    """The judge's parser here: fraction of even ids in the verdict (random weights write no words)."""
    ids = verdict.split()
    return sum(int(t) % 2 == 0 for t in ids) / max(1, len(ids))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes and workload on CPU (gloo)")
    p.add_argument("--rewards", default="rule,model,model_offload,judge", help=f"comma-separated, of {REWARDS}")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--rm-max-tokens", type=int, default=32768, help="reward model: padded tokens per forward")
    p.add_argument("--judge-new-tokens", type=int, default=32, help="verdict length")
    p.add_argument("--judge-template-tokens", type=int, default=64, help="filler tokens of the judge prompt")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.n, args.prompt_len, args.max_new_tokens = 2, 2, 8, 6
        args.micro_batch, args.judge_new_tokens, args.judge_template_tokens, args.steps = 4, 4, 8, 2
    unknown = set(args.rewards.split(",")) - set(REWARDS)
    if unknown:
        raise SystemExit(f"--rewards: unknown {sorted(unknown)}; choose from {REWARDS}")
    return args


def random_model(shape: dict, layout: Layout, dtype: torch.dtype, seed: int, score_head: bool = False) -> HFActor:
    """A random-weight model built on this rank's device, with the id tokenizer."""
    config = ModelConfig(**shape, hf_extra={"eos_token_id": EOS_ID})
    model = build_stage(config, layout, score_head=score_head, params_dtype=dtype, device=comm_device(), init_seed=seed)
    return HFActor(model, layout, config, tokenizer=IdTokenizer(), path=None)


def make_reward(kind: str, args, shape: dict, layout: Layout, dtype: torch.dtype):
    offload = kind.endswith("_offload")
    if kind == "rule":
        return even_token_reward
    if kind.startswith("model"):
        return RewardModel(random_model(shape, layout, dtype, seed=1, score_head=True), offload=offload,
                           max_tokens_per_batch=args.rm_max_tokens)
    half = args.judge_template_tokens // 2
    before, after = (" ".join(str(10 + i) for i in range(k, k + half)) for k in (0, half))
    template = f"{before} {{prompt}} {{response}} {after}"
    return LLMJudgerReward(random_model(shape, layout, dtype, seed=2), prompt_template=template,
                           parse=even_fraction_verdict, max_new_tokens=args.judge_new_tokens, offload=offload)


def run(kind: str, args, layout: Layout) -> dict:
    """One trainer with reward `kind`: mean phase seconds over the measured steps."""
    shape, dtype = (SMOKE, torch.float32) if args.smoke else (QWEN25_05B, torch.bfloat16)
    actor = random_model(shape, layout, dtype, seed=0)
    actor.tokenizer = None  # the trainer then writes responses as space-separated ids (IdTokenizer's text)
    reward = make_reward(kind, args, shape, layout, dtype)
    cfg = TrainerConfig()
    cfg.model.dtype = "float32" if args.smoke else "bfloat16"
    cfg.data.max_prompt_length = args.prompt_len
    cfg.rollout.max_batch = args.prompts * args.n
    cfg.trainer.progress_bar = False
    trainer = PPOTrainer(actor, reward_fn=reward, algorithm="grpo", rollout_batch_size=args.prompts, n_samples=args.n,
                         max_new_tokens=args.max_new_tokens, temperature=1.0, lr=1e-6,
                         micro_batch_size=args.micro_batch, num_epochs=1, config=cfg)
    gen = torch.Generator().manual_seed(1000)
    history = []
    for step in range(args.steps):
        samples = []
        for _ in range(args.prompts):
            ids = torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=gen).tolist()
            samples.append({"prompt_ids": ids, "prompt": " ".join(map(str, ids)) + " "})
        metrics = trainer.step(samples)
        if step >= args.warmup:
            history.append(metrics)
    result = {"reward": kind}
    for key in [f"time/{p}" for p in PHASES] + ["time/step", "response_length/mean", "reward/mean", "reward/failures"]:
        result[key] = statistics.mean(m.get(key, 0.0) for m in history)
    result["reward_share"] = result["time/reward"] / result["time/step"]
    result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer, actor, reward
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def markdown(results: list[dict], args, device: str) -> str:
    shape = "tiny smoke shape, fp32" if args.smoke else "Qwen2.5-0.5B shape, bf16"
    lines = [f"# GRPO step with model rewards ({shape}, 1 x {device})", "",
             f"{args.prompts} prompts x {args.n} responses, prompt {args.prompt_len} tokens, {args.max_new_tokens} "
             f"new tokens; judge: {args.judge_template_tokens} template + {args.judge_new_tokens} verdict tokens; "
             f"mean of {args.steps - args.warmup} steps after {args.warmup} warm-up.", "",
             "| reward | " + " | ".join(f"{p} s" for p in PHASES) + " | step s | reward share | peak GiB |",
             "|---" * (len(PHASES) + 4) + "|"]
    for r in results:
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "-"
        cells = [f"{r[f'time/{p}']:.3f}" for p in PHASES] + [f"{r['time/step']:.3f}", f"{r['reward_share']:.1%}", mem]
        lines.append(f"| {r['reward']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(backend="gloo" if args.smoke else None)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU is visible; use --smoke for the CPU check")
    if dist.get_world_size() != 1:
        raise SystemExit("run as one process (1 GPU)")
    layout = Layout.create(1, 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    results = []
    for kind in args.rewards.split(","):
        results.append(run(kind, args, layout))
        print(json.dumps(results[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reward_models.json"), "w") as f:
        json.dump({"device": device, "args": vars(args), "results": results}, f, indent=2)
    with open(os.path.join(args.out, "reward_models.md"), "w") as f:
        f.write(markdown(results, args, device))
    print(markdown(results, args, device))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
