"""`verl-mega demo --task tool`: a tiny model that cannot multiply three-digit numbers in its head learns,
by SFT on formatted examples and then GRPO, to call the Python tool and copy its answer.

Task: "437*286" -> "124982". The chat (the character tokenizer's ChatML template):

    user:       437*286
    assistant:  <tool_call>{"name": "code_interpreter", "arguments": {"code": "print(437*286)"}}</tool_call>
    tool:       124982
    assistant:  124982

Steps (every rank runs them; rank 0 writes files and prints):
 1. write a random tiny Llama + the character tokenizer (verl_mega.testing.tiny_hf) -> model_init/;
 2. SFT on formatted examples: a fraction `--tool-fraction` (< 1/2) of them call the tool, the rest
    answer directly ("The answer is <product>", which a 2-layer model cannot compute), so the greedy SFT
    model answers in its head (accuracy ~0) while sampling calls the tool `tool_fraction` of the time
    -> model_sft/;
 3. GRPO with `PPOTrainer(tools=[SandboxFusionTool()])` (no URL: the local bubblewrap sandbox), reward =
    exact match of the final line with the product; the agent loop runs the calls during rollout;
 4. held-out greedy accuracy and tool-call rate (the agent loop at temperature 0) before and after RL
    -> summary.json, and metrics.jsonl (every RL step's metrics, val/accuracy before and after RL; the
    file `verl-mega demo --plot DIR` reads); train.jsonl / heldout.jsonl for `verl-mega train
    examples/configs/tool_grpo.yaml` (the same RL from the command line).
"""

from __future__ import annotations

import json
import os
import random
import time

import torch
import torch.distributed as dist

from verl_mega.apps.demo_task import right_pad_supervised, write_jsonl

DATA_SOURCE = "multiply_tool"
TOOL_NAME = "code_interpreter"
DIRECT = "The answer is "  # how a direct (in-head) answer starts: the first token is "T" or the tool call's "<"
DEFAULTS = dict(train=4000, heldout=100, tool_fraction=0.4, sft_steps=800, sft_batch=32, sft_lr=2e-3,
                rl_steps=25, rl_lr=5e-4, rollout_batch=16, n_samples=8, hidden=128, layers=2)
QUICK = dict(train=200, heldout=16, sft_steps=20, rl_steps=2, rollout_batch=4, n_samples=4, hidden=64)


def make_rows(seed: int, num_train: int, num_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of distinct three-digit products, verl's dataset format."""
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < num_train + num_heldout:
        pairs.add((rng.randint(100, 999), rng.randint(100, 999)))
    rows = [{"prompt": [{"role": "user", "content": f"{a}*{b}"}], "data_source": DATA_SOURCE,
             "reward_model": {"ground_truth": str(a * b), "style": "rule"}, "extra_info": {"a": a, "b": b}}
            for a, b in sorted(pairs)]
    rng.shuffle(rows)
    return rows[num_heldout:], rows[:num_heldout]


def tool_call_text(row: dict) -> str:
    code = f"print({row['prompt'][0]['content']})"
    return "<tool_call>" + json.dumps({"name": TOOL_NAME, "arguments": {"code": code}}) + "</tool_call>"


def sft_chat(row: dict, use_tool: bool) -> list[dict]:
    """The formatted conversation of a row: with the tool call and its result, or the direct answer."""
    truth = row["reward_model"]["ground_truth"]
    if not use_tool:
        return row["prompt"] + [{"role": "assistant", "content": DIRECT + truth}]
    return row["prompt"] + [{"role": "assistant", "content": tool_call_text(row)},
                            {"role": "tool", "content": truth + "\n"},
                            {"role": "assistant", "content": truth}]


def sft_tensors(chats: list[list[dict]], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) [B, S]: the loss predicts the assistant turns' tokens
    (their <|im_end|> included) and nothing else."""
    seqs, masks = [], []
    for chat in chats:
        ids, lm = [], []
        for k in range(len(chat)):
            # tokens added by message k: the rendering of chat[:k+1] past the rendering of chat[:k]
            before = tokenizer.apply_chat_template(chat[:k], tokenize=False) if k else ""
            after = tokenizer.apply_chat_template(chat[:k + 1], tokenize=False)
            new = tokenizer.encode(after[len(before):], add_special_tokens=False)
            if chat[k]["role"] == "assistant":
                head = len(tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False))
                ids += new[:-1]  # drop the template's trailing "\n" after <|im_end|> from the trained part
                lm += [0] * head + [1] * (len(new) - 1 - head)
                ids.append(new[-1])
                lm.append(0)
            else:
                ids += new
                lm += [0] * len(new)
        seqs.append(ids)
        masks.append(lm)
    return right_pad_supervised(seqs, masks, tokenizer.pad_token_id)


def final_answer(text: str) -> str:
    """The answer of a decoded response (special tokens skipped): its last non-empty line, without DIRECT."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last[len(DIRECT):] if last.startswith(DIRECT) else last


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info=None) -> float:
    """1.0 if the response's answer (final_answer) is exactly the product, else 0.0."""
    return float(final_answer(solution_str) == str(ground_truth))


def make_model_dir(out_dir: str, hidden: int, layers: int, seed: int) -> str:
    from verl_mega.testing.tiny_hf import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = make_tiny_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def supervise(actor, rows: list[dict], args, say) -> float:
    """Next-token SFT on formatted chats (a `tool_fraction` of them with the tool call); returns the last loss."""
    from verl_mega.trainer.engine import TrainEngine, causal_lm_microbatches, next_token_loss
    from verl_mega.trainer.optim import OptimConfig

    engine = TrainEngine(actor.model, actor.layout, OptimConfig(lr=args.sft_lr, weight_decay=0.0))
    loss_fn = next_token_loss(engine)
    rng = random.Random(args.seed)
    loss = float("nan")
    for step in range(1, args.sft_steps + 1):
        batch = [rng.choice(rows) for _ in range(args.sft_batch)]
        chats = [sft_chat(r, rng.random() < args.tool_fraction) for r in batch]
        ids, mask, loss_mask = sft_tensors(chats, actor.tokenizer)
        (mb,) = causal_lm_microbatches(ids, mask)
        mb["loss_mask"] = loss_mask
        loss = engine.forward_backward([mb], loss_fn)["loss"]
        engine.optimizer_step()
        if step % 50 == 0 or step == args.sft_steps:
            say(f"[tool demo] SFT step {step}: loss {loss:.3f}")
    return float(loss)


def evaluate(actor, toolset, rows: list[dict], max_total_tokens: int) -> dict[str, float]:
    """Greedy multi-turn rollout on `rows`: exact-match accuracy and the fraction of samples that called a tool."""
    from verl_mega.rollout.agent_loop import AgentLimits, agent_rollout
    from verl_mega.rollout.sampling import SamplingParams

    tok = actor.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for r in rows]
    samples, _ = agent_rollout(actor.rollout_worker(), tok, toolset, AgentLimits(2, max_total_tokens, 30.0), prompts,
                               n=1, sampling=SamplingParams(temperature=0.0))
    texts = [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    acc = sum(compute_score(DATA_SOURCE, t, r["reward_model"]["ground_truth"]) for t, r in zip(texts, rows)) / len(rows)
    return {"accuracy": acc, "tool_call_rate": sum(s.tool_calls > 0 for s in samples) / len(rows),
            "example": texts[0]}


def run(args) -> dict:
    """The tool demo on this rank (see the module docstring); returns the summary dict."""
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.tools import SandboxFusionTool, ToolSet
    from verl_mega.trainer.config import TrainerConfig
    from verl_mega.trainer.metrics import MetricsLogger
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    def say(*msg):
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(*msg, flush=True)

    start = time.time()
    torch.manual_seed(args.seed)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout.create(tp=args.tp or world, pp=1)
    out = os.path.abspath(args.output_dir)
    base_dir, sft_dir = os.path.join(out, "model_init"), os.path.join(out, "model_sft")
    train_rows, heldout_rows = make_rows(args.seed, args.train, args.heldout)
    if layout.rank == 0:
        make_model_dir(base_dir, args.hidden, args.layers, args.seed)
        write_jsonl(train_rows, os.path.join(out, "train.jsonl"))  # for `verl-mega train` (examples/configs/tool_grpo.yaml)
        write_jsonl(heldout_rows, os.path.join(out, "heldout.jsonl"))
    dist.barrier()
    say(f"[tool demo] {len(train_rows)} train / {len(heldout_rows)} held-out products, {layout}")
    actor = get_actor_model(base_dir, layout=layout)
    sft_loss = supervise(actor, train_rows, args, say)
    actor.save_hf(sft_dir)
    dist.barrier()
    del actor  # its SFT engine's gradient hooks stay on the model: RL loads the saved model afresh
    actor = get_actor_model(sft_dir, layout=layout)
    sft_s = time.time() - start
    toolset = ToolSet([SandboxFusionTool(default_timeout=10.0)], timeout_s=30.0)  # no URL: the local sandbox
    max_total = 160
    before = evaluate(actor, toolset, heldout_rows, max_total)
    say(f"[tool demo] SFT ({args.sft_steps} steps, loss {sft_loss:.3f}, {sft_s:.0f} s): held-out accuracy "
        f"{before['accuracy']:.1%}, tool-call rate {before['tool_call_rate']:.1%}")
    cfg = TrainerConfig()
    cfg.model.path = sft_dir
    cfg.trainer.output_dir, cfg.trainer.seed, cfg.trainer.save_final = os.path.join(out, "rl"), args.seed, False
    cfg.trainer.total_steps, cfg.trainer.rollout_batch_size = args.rl_steps, args.rollout_batch
    cfg.algorithm.name, cfg.algorithm.kl_coef = "grpo", 0.0
    cfg.optim.lr, cfg.optim.warmup_steps = args.rl_lr, 0
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens, cfg.rollout.max_turns = args.n_samples, max_total, 2
    cfg.data.max_prompt_length = 64
    trainer = PPOTrainer(actor, reward_fn=compute_score, tools=toolset, config=cfg)
    # metrics.jsonl as the other demos write it (`verl-mega demo --plot` reads it): the held-out accuracy at
    # step 0 and after the last step (val/accuracy), every RL step's training metrics between
    if layout.rank == 0 and os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))
    logger = MetricsLogger(out, enabled=layout.rank == 0)
    logger.log(0, {"val/accuracy": before["accuracy"]})
    rng = random.Random(args.seed + 1)
    history = []
    for step in range(args.rl_steps):
        metrics = trainer.step([rng.choice(train_rows) for _ in range(args.rollout_batch)])
        history.append(metrics)
        logger.log(trainer.global_step, metrics)
        say(f"[tool demo] GRPO step {step + 1}: reward {metrics['reward/mean']:.3f}, tool calls/sample "
            f"{metrics.get('agent/tool_calls', 0):.2f}, tool errors/sample {metrics.get('agent/tool_errors', 0):.2f}")
    after = evaluate(actor, toolset, heldout_rows, max_total)
    logger.log(trainer.global_step, {"val/accuracy": after["accuracy"]})
    logger.close()
    seconds = time.time() - start
    summary = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
               "tool_call_rate_before": before["tool_call_rate"], "tool_call_rate_after": after["tool_call_rate"],
               "example_after": after["example"], "sft_steps": args.sft_steps, "rl_steps": args.rl_steps,
               "seconds": seconds, "sft_seconds": sft_s, "layout": repr(layout),
               "rewards": [h["reward/mean"] for h in history]}
    if layout.rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    say(f"[tool demo] held-out accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
        f"({(after['accuracy'] - before['accuracy']) * 100:+.1f} points); tool-call rate "
        f"{before['tool_call_rate']:.1%} -> {after['tool_call_rate']:.1%}; {seconds:.0f} s in all")
    say(f"[tool demo] the same RL from the command line: verl-mega train examples/configs/tool_grpo.yaml "
        f"model.path={sft_dir} data.train_path={os.path.join(out, 'train.jsonl')} "
        f"data.val_path={os.path.join(out, 'heldout.jsonl')}")
    return summary
