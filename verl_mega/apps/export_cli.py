"""`verl-mega export CKPT_DIR HF_OUT_DIR`: distributed checkpoint -> Hugging Face directory.

Runs in one process at tp = pp = 1 (DCP reshards whatever layout the checkpoint was saved from):
reads the model config and tokenizer path recorded in the checkpoint's COMPLETE marker, builds the
whole model, loads the fp32 master weights and writes config.json + model.safetensors (+ tokenizer
files) with `verl_mega.models.hf_io.save_hf`. CKPT_DIR may be a checkpoint root (the newest complete
`step_N` is used) or one `step_N` directory.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def export(ckpt: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the newest complete checkpoint under `ckpt` to `out_dir` as a HF directory; returns the checkpoint used."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import save_hf
    from verl_mega.models.parallelize import build_stage
    from verl_mega.parallel import Layout
    from verl_mega.trainer.checkpoint import find_checkpoint, load_model_weights, read_marker

    path, refused = find_checkpoint(ckpt)
    for message in refused:
        print(message, file=sys.stderr)
    if path is None:
        raise ValueError(f"no complete checkpoint found under {ckpt}")
    marker = read_marker(path)
    if not marker.get("model_config"):
        raise ValueError(f"checkpoint {path} does not record a model config (saved from a model without one)")
    config = ModelConfig.from_hf(marker["model_config"])
    layout = Layout.create(1, 1, 1)
    model = build_stage(config, layout, value_head=bool(marker.get("value_head")), init_seed=None)
    load_model_weights(model, layout, path)
    model.to(getattr(torch, dtype))
    tokenizer = None
    tok_path = marker.get("tokenizer_path")
    if tok_path and os.path.exists(tok_path):
        from verl_mega.models.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tok_path)
    elif tok_path:
        print(f"warning: tokenizer path {tok_path} recorded in {path} does not exist; writing no tokenizer",
              file=sys.stderr)
    save_hf(model, layout, out_dir, config, tokenizer)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verl-mega export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="checkpoint root (newest complete step_N is used) or a step_N directory")
    parser.add_argument("hf_out_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt_dir, args.hf_out_dir, args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"verl-mega export: {exc}", file=sys.stderr)
        return 1
    print(f"exported {path} -> {args.hf_out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
