"""Peer baseline: TRL's `GRPOTrainer` on the same model shape and workload as benchmarks/throughput.py.

    python benchmarks/trl_grpo.py --shape 0.5b            # 8 prompts x 8, prompt 128, 256 new tokens, beta=0, 1 GPU
    python benchmarks/trl_grpo.py --smoke                 # CPU check: tiny shape, 2 steps
    python benchmarks/throughput.py --shapes 0.5b --batches 8x8 --kl off --peer OUT/trl_grpo.json   # the ratio

The model is a `transformers` Qwen2ForCausalLM built locally from throughput.py's shape table (random
weights, bf16 on CUDA, fp32 on CPU); the tokenizer is built locally too (a `tokenizers` WordLevel model with
one word "t<id>" per id of the model's vocabulary, EOS = pad = id 2 as in throughput.py), so nothing is
downloaded. Prompts are PROMPT_LEN random words, i.e. exactly PROMPT_LEN tokens.

TRL settings: its defaults (beta=0: no reference model; loss "dapo"; gradient checkpointing on, as
GRPOConfig ships it: `--gradient-checkpointing off` to compare without), generation with transformers'
`generate` (no vLLM: not installed on the GPU machine), `num_generations` = samples per prompt,
per-device batch `--micro-batch` completions with gradient accumulation so that one optimizer step consumes
one generation batch of PROMPTS x SAMPLES completions, exactly as one verl_mega RL step does.

Reported the same way as throughput.py: tokens/s/GPU = (prompt + completion tokens of every sequence) /
step wall time (between consecutive optimizer-step ends, after `--warmup` steps) / GPUs; peak memory.
Writes OUT/trl_grpo.json (OUT: --out, $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import torch


def _load_throughput():
    """benchmarks/throughput.py as a module (its shape table and EOS id), loaded by path: the benchmarks
    directory itself must stay off sys.path, or its kernels.py shadows the `kernels` package transformers probes."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.util.spec_from_file_location("verl_mega_bench_throughput", os.path.join(here, "throughput.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_throughput = _load_throughput()
EOS_ID, SHAPES = _throughput.EOS_ID, _throughput.SHAPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="completions per prompt (TRL num_generations)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256, help="max_completion_length")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per forward/backward (per_device_train_batch_size; default: all PROMPTS x N of a step, "
                        "what throughput.py's --micro-batch auto picks at 0.5B on an 80 GB card)")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on", help="TRL's default: on")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny shape, 2x2 batch, short lengths, 3 steps")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.prompts, args.n, args.prompt_len, args.new_tokens = "smoke", 2, 2, 16, 8
        args.micro_batch, args.steps, args.warmup = 2, 3, 1
    rows = args.prompts * args.n
    args.micro_batch = args.micro_batch or rows
    if rows % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch} must divide prompts x n = {rows}")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup {args.warmup} must leave at least one measured step of --steps {args.steps}")
    return args


def build_tokenizer(vocab_size: int):
    """A WordLevel tokenizer with one word per model id ("t<id>", id EOS_ID = "<eos>"), whitespace-split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<eos>"] = vocab.pop(f"t{EOS_ID}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="t0")


def build_model(shape: dict, dtype: torch.dtype):
    """Qwen2ForCausalLM with `shape` and random weights (transformers' own init), on the GPU if there is one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                         max_position_embeddings=shape["max_position_embeddings"],
                         tie_word_embeddings=shape["tie_word_embeddings"],
                         rope_parameters={"rope_type": "default", "rope_theta": shape.get("rope_theta", 10000.0)},
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID, bos_token_id=None)
    assert shape["hidden_size"] // shape["num_heads"] == shape["head_dim"]  # Qwen2 derives head_dim so
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise on the GPU: seconds, not minutes
        return Qwen2ForCausalLM(config).to(dtype)


class Recorder:
    """The reward function (fraction of even completion ids, as throughput.py's) that also records each
    generation batch's token count, plus a TrainerCallback timing optimizer steps."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.tokens: list[int] = []  # prompt + completion tokens per generation batch
        self.step_ends: list[float] = []
        self.__name__ = "even_token_reward"

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        self.tokens.append(sum(self.prompt_len + len(c) for c in completion_ids))
        return [sum(i % 2 == 0 for i in c) / max(1, len(c)) for c in completion_ids]

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepTimer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.step_ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                recorder.step_ends.append(time.perf_counter())

        return StepTimer()


def main(argv=None) -> None:
    args = parse_args(argv)
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no GPU visible: real shapes need CUDA; use --smoke for the CPU check")
    shape = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(f"t{i}" for i in torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=gen).tolist())
               for _ in range(args.prompts * args.steps)]
    rows = args.prompts * args.n
    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trl_grpo_run"), report_to="none", save_strategy="no", logging_steps=1,
        max_steps=args.steps, learning_rate=1e-6, beta=0.0, num_generations=args.n,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=rows // args.micro_batch,
        max_completion_length=args.new_tokens, temperature=1.0, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing == "on", shuffle_dataset=False, seed=args.seed)
    recorder = Recorder(args.prompt_len)
    tokenizer = build_tokenizer(shape["vocab_size"])
    assert len(tokenizer(prompts[0])["input_ids"]) == args.prompt_len
    trainer = GRPOTrainer(model=build_model(shape, torch.bfloat16 if cuda else torch.float32), reward_funcs=recorder,
                          args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=tokenizer, callbacks=[recorder.callback()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_s = [b - a for a, b in zip(recorder.step_ends, recorder.step_ends[1:])][args.warmup:]
    tokens = recorder.tokens[args.warmup:len(step_s) + args.warmup]
    mean_s, mean_tokens = statistics.mean(step_s), statistics.mean(tokens)
    result = {
        "framework": f"TRL {trl.__version__} GRPOTrainer", "device": torch.cuda.get_device_name() if cuda else "CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/trl_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args), "gpus": 1, "measured_steps": len(step_s), "step_s": mean_s,
        "tokens_per_step": mean_tokens, "mean_response_len": mean_tokens / rows - args.prompt_len,
        "tokens_per_s_per_gpu": mean_tokens / mean_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trl_grpo.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    print(f"\nTRL GRPOTrainer, {args.shape}, {args.prompts}x{args.n}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens: {result['tokens_per_s_per_gpu']:.0f} tokens/s/GPU "
          f"({mean_s:.2f} s/step, mean completion {result['mean_response_len']:.0f} tokens)")


if __name__ == "__main__":
    main()
