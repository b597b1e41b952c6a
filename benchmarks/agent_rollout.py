"""Multi-turn rollout with a 100 ms tool: tool calls overlapped with decoding (AgentLoop) vs run serially.

    python benchmarks/agent_rollout.py            # CUDA: Qwen2.5-0.5B shape (random weights), 64 prompts x 8
    python benchmarks/agent_rollout.py --smoke    # CPU: tiny shape, 4 prompts x 2 (checks the script end to end)

What is measured: the rollout of one multi-turn GRPO step (B prompts x n samples, `--turns` assistant turns
each, a tool call ending every turn but the last) on the real GenerationEngine, twice:
 - overlapped: `AgentLoop` (tools on a background asyncio loop while the other samples keep decoding);
 - serial: the same loop, but each finished turn's tool calls are awaited before the engine steps again
   (what a rollout without asynchronous tools does).
Reported per mode: wall seconds, model tokens/s (sampled tokens / wall), and the fraction of wall time
the GPU was decoding (time inside `engine.step()`, which ends with a host read of the sampled tokens, so
it covers the device work it launched).

The model's tokens are scripted with the engine's `force_tokens` (each turn: a filler of `--turn-tokens`
+- 50% characters, then a tool call, then EOS; the character tokenizer of verl_mega.testing.tiny_hf;
lengths seeded per (request, sample), so both modes do the same work); the forward passes, sampling, KV
cache and scheduling are the engine's own. The tool sleeps `--tool-ms` (asyncio).
The update part of the GRPO step does not depend on how tools are scheduled and is not timed here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # benchmarks/kernels.py shadows `kernels`
sys.path.insert(0, os.path.dirname(_HERE))

from verl_mega.rollout.agent_loop import AgentLimits, AgentLoop  # noqa: E402
from verl_mega.rollout.engine import GenerationEngine  # noqa: E402
from verl_mega.rollout.scheduler import RequestParams  # noqa: E402
from verl_mega.tools.base import Tool  # noqa: E402
from verl_mega.tools.toolset import ToolSet  # noqa: E402

CALL = '<tool_call>{"name": "sleep", "arguments": {}}</tool_call>'
SHAPE_05B = dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                 vocab_size=151936, max_position_embeddings=4096)
SHAPE_SMOKE = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=128,
                   max_position_embeddings=1024)


class SleepTool(Tool):
    name, description, parameters = "sleep", "waits", {"type": "object", "properties": {}}

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def execute(self) -> str:
        await asyncio.sleep(self.seconds)
        return "ok"


class SerialAgentLoop(AgentLoop):
    """The baseline: a finished turn's tool calls are waited for before the engine steps again."""

    def _finish_turn(self, chat, key, token_ids, logprobs, runner) -> bool:
        waits = super()._finish_turn(chat, key, token_ids, logprobs, runner)
        if waits and runner.lead:
            runner.futures[key].result()  # block decoding until this sample's tools are done
        return waits


class ScriptedEngine(GenerationEngine):
    """The engine whose samples generate scripted turns (`force_tokens`) and that times its `step` calls.

    Sample (request, j) has `turns` turns: filler + a tool call + EOS (the last: filler + EOS), the filler
    length drawn from [0.5, 1.5] x `turn_tokens` by a generator seeded with (seed, request, j, turn)."""

    def __init__(self, *args, tokenizer, turns: int, turn_tokens: int, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.turns, self.turn_tokens, self.script_seed = turns, turn_tokens, seed
        self.eos = tokenizer.eos_token_id
        self.call_ids = tokenizer.encode(CALL, add_special_tokens=False)
        self.filler = tokenizer.encode("a", add_special_tokens=False)[0]
        self.turn_of: dict[tuple[int, int], int] = {}  # (request, sample) -> its current turn
        self.step_s = 0.0  # wall time inside step() (it ends with a host read of the sampled tokens)

    def _script(self, request_id: int, sample_index: int) -> None:
        turn = self.turn_of[(request_id, sample_index)]
        rng = random.Random(f"{self.script_seed}:{request_id}:{sample_index}:{turn}")
        filler = [self.filler] * max(1, int(self.turn_tokens * rng.uniform(0.5, 1.5)))
        call = self.call_ids if turn < self.turns - 1 else []
        self.force_tokens(request_id, sample_index, filler + call + [self.eos])

    def add_request(self, prompt_ids, params=None, **kwargs) -> int:
        rid = super().add_request(prompt_ids, params, **kwargs)
        for j in range((params or RequestParams()).n):
            self.turn_of[(rid, j)] = 0
            self._script(rid, j)
        return rid

    def append(self, request_id, token_ids, *, sample_index=0, max_new_tokens=None) -> None:
        super().append(request_id, token_ids, sample_index=sample_index, max_new_tokens=max_new_tokens)
        key = (request_id, sample_index)
        self.turn_of[key] = min(self.turn_of[key] + 1, self.turns - 1)
        self._script(request_id, sample_index)

    def step(self):
        t0 = time.perf_counter()
        out = super().step()
        self.step_s += time.perf_counter() - t0
        return out


def build(args, tmp: str):
    """(engine factory, tokenizer): the model is written and loaded once; every call makes a fresh engine."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import load_hf_weights
    from verl_mega.models.parallelize import build_stage
    from verl_mega.models.tokenizer import load_tokenizer
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.engine_config import EngineConfig
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    shape = dict(SHAPE_SMOKE if args.smoke else SHAPE_05B)
    vocab = shape.pop("vocab_size")
    path = make_tiny_hf_model(os.path.join(tmp, "model"), arch="qwen2", vocab_size=vocab, **shape)
    tok = load_tokenizer(path)
    layout = Layout.create(tp=1, pp=1)
    model = build_stage(ModelConfig.from_hf(path), layout, init_seed=None)
    load_hf_weights(model, path)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = model.to(device=args.device, dtype=dtype).eval()
    rows = args.prompts * args.n
    seq_len = 64 + args.max_total_tokens
    config = EngineConfig(max_batch=min(rows, 256), max_seq_len=seq_len, max_tokens=rows * seq_len + 4096)

    def make_engine():
        return ScriptedEngine(model, layout.tp_group, config, eos_token_ids=[tok.eos_token_id],
                              pad_token_id=tok.pad_token_id, tokenizer=tok, turns=args.turns,
                              turn_tokens=args.turn_tokens, seed=args.seed)
    return make_engine, tok


def _rollout(args, engine, tok, serial: bool) -> dict:
    cls = SerialAgentLoop if serial else AgentLoop
    loop = cls(engine, tok, ToolSet([SleepTool(args.tool_ms / 1000)]),
               AgentLimits(max_turns=args.turns, max_total_tokens=args.max_total_tokens, tool_timeout_s=30.0))
    prompts = [[{"role": "user", "content": f"task {i}"}] for i in range(args.prompts)]
    t0 = time.perf_counter()
    samples = loop.run(prompts, n=args.n, seed=args.seed)
    wall = time.perf_counter() - t0
    engine.release()
    model_tokens = sum(sum(s.loss_mask) for s in samples)
    return {"wall_s": wall, "model_tokens": model_tokens, "tokens_per_s": model_tokens / wall,
            "decode_fraction": engine.step_s / wall, "tool_calls": sum(s.tool_calls for s in samples),
            "turns_mean": sum(s.turns for s in samples) / len(samples)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 4 prompts x 2, short turns")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--turn-tokens", type=int, default=128, help="mean filler tokens per turn")
    p.add_argument("--tool-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.n, args.turn_tokens = 4, 2, 16
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    args.max_total_tokens = args.turns * (int(args.turn_tokens * 1.5) + 2 * len(CALL) + 64)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "shape": "smoke" if args.smoke else "qwen2.5-0.5b", "prompts": args.prompts, "n": args.n,
                  "turns": args.turns, "tool_ms": args.tool_ms}
        make_engine, tok = build(args, tmp)
        if args.device == "cuda":  # one warm-up rollout (kernel compiles, cuBLAS) for both modes; the serial
            _rollout(args, make_engine(), tok, False)  # one would cost >= tool calls x tool time on its own
        for mode, serial in (("overlapped", False), ("serial", True)):
            result[mode] = _rollout(args, make_engine(), tok, serial)  # a fresh engine each
            print(json.dumps({mode: result[mode]}), flush=True)
        result["speedup"] = result["serial"]["wall_s"] / result["overlapped"]["wall_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
