"""torchrun script for test_checkpoint_kill.py: dp=2 training that checkpoints after every step and,
with --kill-at K, has rank 1 SIGKILL itself at the start of step K (a crashed node).

    torchrun --nproc_per_node 2 kill_resume_script.py --hf-dir D --ckpt C --steps 3 --kill-at 2 --jsonl L

On start it resumes from the newest complete checkpoint in C. Rank 0 appends one JSON line per step
({"step", "loss", "grad_norm", "start"}) to L; rank 1 writes L + ".killed" (a timestamp) before dying.
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402

from _engine_cases import build_engine, train  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.trainer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--jsonl", required=True)
    args = parser.parse_args()
    layout = Layout.create(tp=1, pp=1, dp=2)
    engine = build_engine(layout, args.hf_dir)
    info = load_checkpoint(engine, args.ckpt)
    start = info["data_state"]["next_step"] if info else 0
    for step in range(start, args.steps):
        if step == args.kill_at and dist.get_rank() == 1:
            with open(args.jsonl + ".killed", "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        ((loss, norm, _),) = train(engine, [step], layout)
        if dist.get_rank() == 0:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "grad_norm": norm, "start": start}) + "\n")
        save_checkpoint(engine, args.ckpt, step + 1, data_state={"next_step": step + 1}, keep_last=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
