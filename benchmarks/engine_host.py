"""Host time of the rollout engine's bookkeeping per decode window, without model work (CPU).

    python benchmarks/engine_host.py                       # 64 prompts x 8, lengths 32..1024, max_batch 512
    python benchmarks/engine_host.py --prompts 4 --n 2 --max-len 40    # a quick check

On a GPU the host reads a window's sampled tokens once (`sync_every` steps), then records them, frees finished
rows, admits waiting ones and stages the next window while the GPU waits: this is that host time. The engine is
the real one (scheduler, paged-cache block tables, staging, forced lengths) on a tiny model; its decode step
returns the logits buffer unchanged and its sampler a fixed token (the forced EOS where one is due), so what is
timed is the engine's own Python and tensor bookkeeping. Reported: host ms per window outside the stubbed
decode and sampling (`_decode_window`'s time less theirs), and per `step()` outside the window and the prefill.
Compare two trees by running it in each on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# this directory holds kernels.py, which would shadow the `kernels` package transformers imports
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from benchmarks.forced_lengths import draw_lengths  # noqa: E402
from verl_mega.models.config import ModelConfig  # noqa: E402
from verl_mega.models.hf_io import load_hf_weights  # noqa: E402
from verl_mega.models.parallelize import build_stage  # noqa: E402
from verl_mega.parallel.layout import Layout  # noqa: E402
from verl_mega.rollout.engine import GenerationEngine  # noqa: E402
from verl_mega.rollout.engine_config import EngineConfig  # noqa: E402
from verl_mega.rollout.sampling import SamplingParams  # noqa: E402
from verl_mega.rollout.scheduler import RequestParams  # noqa: E402
from verl_mega.testing.tiny_hf import make_tiny_hf_model  # noqa: E402

EOS = 3


def stubbed_engine(args, path: str) -> tuple[GenerationEngine, dict]:
    """The engine on the tiny model at `path`, its decode and sampling replaced by stubs that time themselves."""
    model = build_stage(ModelConfig.from_hf(path), Layout.create(tp=1, pp=1), init_seed=None)
    load_hf_weights(model, path)
    config = EngineConfig(max_batch=args.max_batch, max_seq_len=args.prompt_len + args.max_len + 64,
                          max_tokens=args.max_tokens, block_size=16, sync_every=args.sync_every)
    engine = GenerationEngine(model.eval(), None, config, eos_token_ids=[EOS], pad_token_id=0)
    seconds = {"decode": 0.0, "sample": 0.0, "window": 0.0, "prefill": 0.0, "windows": 0}
    token = torch.full((args.max_batch,), 5, dtype=torch.long)
    logprob = torch.zeros(args.max_batch)

    def timed(name, fn):
        def run(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            seconds[name] += time.perf_counter() - start
            return out
        return run

    def sample(logits, groups, forced, seed=None):
        rows = logits.shape[0]
        return (token[:rows] if forced is None else torch.where(forced >= 0, forced, token[:rows])), logprob[:rows]

    def window(fn):
        def run():
            seconds["windows"] += 1
            return fn()
        return run

    engine._decode = timed("decode", lambda bb, nb: engine._logits)
    engine._sample = timed("sample", sample)
    engine._decode_window = timed("window", window(engine._decode_window))
    engine._prefill = timed("prefill", engine._prefill)
    return engine, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=262144, help="KV-cache tokens (EngineConfig.max_tokens)")
    p.add_argument("--sync-every", type=int, default=8, help="decode steps per window (the CUDA default)")
    p.add_argument("--repeats", type=int, default=3, help="rollouts timed; the fastest is reported")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_hf_model(tmp, arch="qwen2", vocab_size=130, seed=3)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(4, 130, (args.prompts, args.prompt_len), generator=gen).tolist()
        lengths = draw_lengths(args.prompts * args.n, (args.min_len, args.max_len), 1)
        runs = []
        for _ in range(args.repeats):
            engine, seconds = stubbed_engine(args, path)
            for i, prompt in enumerate(prompts):
                engine.add_request(prompt, RequestParams(SamplingParams(temperature=1.0), args.max_len, args.n),
                                   ignore_eos=True, eos_at=lengths[i * args.n:(i + 1) * args.n])
            start, tokens = time.perf_counter(), 0
            while engine.has_unfinished():
                tokens += sum(len(done.token_ids) for done in engine.step())
            total = time.perf_counter() - start
            w = seconds["windows"]
            runs.append({"windows": w, "rollout_seconds": total, "tokens": tokens, "forced_tokens": sum(lengths),
                         "host_ms_per_window": (seconds["window"] - seconds["decode"] - seconds["sample"]) / w * 1e3,
                         "step_ms_per_window_outside": (total - seconds["window"] - seconds["prefill"]) / w * 1e3})
    best = min(runs, key=lambda r: r["host_ms_per_window"])
    report = {"args": vars(args), "runs": runs, "best": best}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
