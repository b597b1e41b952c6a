"""`verl-mega export CKPT HF_OUT_DIR`: distributed checkpoint -> Hugging Face directory.

    verl-mega export outputs/run out/hf                          # newest complete actor checkpoint of a run
    verl-mega export outputs/run/checkpoints/actor/step_40 out/hf  # one step

CKPT may be a run directory (`trainer.output_dir`), its `checkpoints/` directory, `checkpoints/actor`
(the newest complete `step_N` is used) or one `step_N` directory (`resolve_checkpoint`). Runs in one
process at tp = pp = 1 (DCP reshards whatever layout the checkpoint was saved from): reads the model
config and the source model directory recorded in the checkpoint's COMPLETE marker, builds the whole
model, loads the fp32 master weights and writes config.json + model.safetensors + the tokenizer with
`verl_mega.models.hf_io.save_hf`, and copies the source's generation_config.json and, for a vision-language
model, its processor files (image processor config, chat template). An output directory already holding other
weight files (a shard index, shards, .bin) is refused: loaders that follow an index would read those; so
is the source model directory itself.
Checkpoints store the source directory as an absolute path; a relative one (older checkpoints) is tried
against the current directory and the run directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch


def resolve_checkpoint(ckpt: str) -> tuple[str, list[str]]:
    """(the checkpoint directory `ckpt` names, refusal messages of newer unusable ones).

    `ckpt`: a step_N directory, an engine root holding step_N directories (checkpoints/actor), a
    trainer root holding actor/ (checkpoints), or a run directory holding checkpoints/actor.
    ValueError listing what was looked at when none holds a complete checkpoint."""
    from verl_mega.trainer.checkpoint import find_checkpoint

    if not os.path.isdir(ckpt):
        raise ValueError(f"checkpoint path {ckpt} does not exist")
    tried = []
    for candidate in (ckpt, os.path.join(ckpt, "actor"), os.path.join(ckpt, "checkpoints", "actor")):
        if os.path.isdir(candidate):
            tried.append(candidate)
            path, refused = find_checkpoint(candidate)
            if path is not None:
                return path, refused
    raise ValueError(f"no complete checkpoint found under {ckpt} (looked in {', '.join(tried)}); give a run "
                     f"directory (trainer.output_dir), its checkpoints/ or checkpoints/actor, or a step_N directory")


def _source_dir(recorded: str | None, ckpt_path: str) -> str | None:
    """The source model directory recorded in a checkpoint, found as given (absolute), against the current
    directory or against the run directory the checkpoint sits in; None when it cannot be found."""
    if not recorded:
        return None
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))))  # run/checkpoints/actor/step_N
    for candidate in (recorded, os.path.join(run_dir, recorded)):
        if os.path.isdir(candidate):
            return candidate
    return None


def export(ckpt: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the checkpoint `ckpt` names (see resolve_checkpoint) to `out_dir` as a HF directory (weights,
    config, tokenizer, generation_config.json); returns the checkpoint directory used."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import other_weight_files, save_hf
    from verl_mega.models.parallelize import build_stage
    from verl_mega.models.tokenizer import load_tokenizer
    from verl_mega.parallel import Layout
    from verl_mega.rollout.actor import copy_processor_files
    from verl_mega.trainer.checkpoint import load_model_weights, read_marker

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"hf_out_dir {out_dir} is an existing file, not a directory")
    stale = other_weight_files(out_dir)
    if stale:  # loaders that follow an index (vLLM, ...) would read those, not the export's model.safetensors
        raise ValueError(f"hf_out_dir {out_dir} already holds other weights ({', '.join(stale[:3])}"
                         f"{', ...' if len(stale) > 3 else ''}; {len(stale)} files) that loaders following a shard "
                         f"index would read instead of the export: pick an empty directory or delete them")
    path, refused = resolve_checkpoint(ckpt)
    for message in refused:
        print(message, file=sys.stderr)
    marker = read_marker(path)
    if not marker.get("model_config"):
        raise ValueError(f"checkpoint {path} does not record a model config (saved from a model without one)")
    recorded = marker.get("tokenizer_path")
    source = _source_dir(recorded, path)
    if recorded and source is None:
        raise ValueError(f"checkpoint {path} records its source model directory {recorded!r}, which does not "
                         f"exist (from {os.getcwd()}); the tokenizer and generation_config.json come from there: "
                         f"run export where the path resolves, or restore that directory")
    if source is not None and os.path.realpath(out_dir) == os.path.realpath(source):
        raise ValueError(f"hf_out_dir {out_dir} is the run's source model directory (model.path): exporting there "
                         f"would overwrite the base model, which a resumed run reloads as its reference policy; "
                         f"pick another directory")
    config = ModelConfig.from_hf(marker["model_config"])
    layout = Layout.create(1, 1, 1)
    model = build_stage(config, layout, value_head=bool(marker.get("value_head")), init_seed=None)
    load_model_weights(model, layout, path)
    model.to(getattr(torch, dtype))
    tokenizer = load_tokenizer(source) if source is not None else None
    save_hf(model, layout, out_dir, config, tokenizer)
    if source is not None and os.path.isfile(os.path.join(source, "generation_config.json")):
        shutil.copyfile(os.path.join(source, "generation_config.json"), os.path.join(out_dir, "generation_config.json"))
    copy_processor_files(source, out_dir)  # a VLM's image processor (its datasets read images with it)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verl-mega export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="run directory, its checkpoints/ or checkpoints/actor (newest complete "
                        "step_N is used), or a step_N directory")
    parser.add_argument("hf_out_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt_dir, args.hf_out_dir, args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"verl-mega export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {path} -> {args.hf_out_dir}; load it with transformers' "
          f"{auto_class(args.hf_out_dir)}.from_pretrained({args.hf_out_dir!r})")
    return 0


def auto_class(hf_dir: str) -> str:
    """The transformers Auto class that loads the exported directory `hf_dir` (from its config.json's
    architectures): a Qwen2.5-VL export is not an AutoModelForCausalLM (transformers refuses it)."""
    import json

    with open(os.path.join(hf_dir, "config.json")) as f:
        arch = (json.load(f).get("architectures") or [""])[0]
    for suffix, auto in (("ForConditionalGeneration", "AutoModelForImageTextToText"),
                         ("ForTokenClassification", "AutoModelForTokenClassification"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification")):
        if arch.endswith(suffix):
            return auto
    return "AutoModelForCausalLM"


if __name__ == "__main__":
    sys.exit(main())
