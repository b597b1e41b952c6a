"""`verl-mega generate`: batched generation for a file of prompts with a Hugging Face model.

    verl-mega generate --model HF_DIR --prompts IN.{jsonl,parquet} --out OUT.jsonl [--tp N] [--n N]
        [--max-new-tokens K] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--batch-size B]
        [--prompt-key KEY] [--dtype float32|bfloat16|float16] [--no-cuda-graph]
    torchrun --nproc_per_node 2 -m verl_mega generate ... --tp 2

Input: the training data format (verl's parquet, or jsonl with the same keys; read by
`verl_mega.data`): one row per prompt whose --prompt-key column ("prompt") holds a chat message list
(the tokenizer's chat template is applied with the generation prompt) or a plain string (used as
it is); a "messages" column also works. Other columns (data_source, reward_model, ...) are kept.
With a vision-language model (a Qwen2.5-VL directory with its processor files), a row's "images" column
(verl's multimodal format: `<image>` markers in the prompt, images as {"bytes"} / {"path"} / paths relative
to the file) is read with the model's image processor; a bad image is an error naming the file and row.

Output (one schema for every --n): one JSON line per input row, in input order: the row's columns
(an image given as bytes written as {"path": ..., "num_bytes": N}: the pixels stay in the input file) plus
    "responses":    list of n response texts (special tokens skipped)
    "response_ids": list of n token-id lists (the stop token included)

The default is sampling at temperature 1.0 (as in RL rollouts); --temperature 0 is greedy.
Under torchrun the world is split into world/tp data-parallel replicas, each generating a
contiguous share of the prompts; global rank 0 gathers and writes the file. Batch b (of
--batch-size prompts) of a replica is sampled with seed --seed + b, so sampled outputs depend on
the number of replicas (greedy does not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verl-mega generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config, weights, tokenizer)")
    p.add_argument("--prompts", required=True, help="input .jsonl or .parquet in the training data format")
    p.add_argument("--out", required=True, help="output jsonl path (written by global rank 0)")
    p.add_argument("--prompt-key", default="prompt", help="column holding the chat messages or prompt string")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the world is split into world/tp replicas)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per response")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--n", type=int, default=1, help="responses per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per engine call (rows = batch-size * n)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (when not given: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on GPU (no CUDA graphs)")
    return p


def read_prompts(path: str, prompt_key: str = "prompt") -> tuple[list[dict], list]:
    """(rows, prompts) of a .jsonl / .parquet file in the training data format; ValueError naming the file
    and row of a malformed or prompt-less row, FileNotFoundError for a missing file."""
    from pathlib import Path

    from verl_mega.data.dataset import read_rows, row_prompt

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    rows, prompts = [], []
    for i, row in enumerate(read_rows(Path(path))):
        if not isinstance(row, dict):
            reason = getattr(row, "reason", f"expected a JSON object, got {type(row).__name__}")
            raise ValueError(f"{path}: row {i}: {reason}")
        try:
            prompts.append(row_prompt(row, prompt_key))
        except ValueError as exc:
            raise ValueError(f"{path}: row {i}: {exc}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows, prompts


def _check_args(args) -> None:
    """ValueError naming the flag for a value out of range (before anything is loaded)."""
    for name in ("tp", "max_new_tokens", "n", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give a file path, e.g. {os.path.join(args.out, 'out.jsonl')}")
    from verl_mega.apps.preflight import first_existing_dir

    parent = first_existing_dir(os.path.dirname(os.path.abspath(args.out)))  # the rest is created
    if not os.path.isdir(parent):
        raise ValueError(f"--out {args.out}: {parent} is a file, not a directory")


def check_layout(args, world_size: int) -> None:
    """ValueError naming --tp when `world_size` processes cannot hold whole tp-way replicas or the model's heads
    cannot be split `--tp` ways (read from --model's config.json, before any weight)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import check_hf_dir

    config = ModelConfig.from_hf(check_hf_dir(args.model))
    try:
        config.check_tp(args.tp)
    except ValueError as exc:
        raise ValueError(f"--tp {args.tp} does not fit the model at --model {args.model}: {exc}") from None
    if world_size % args.tp:
        raise ValueError(f"--tp {args.tp} needs a multiple of {args.tp} processes, but {world_size} were started; "
                         f"launch with `torchrun --nproc-per-node {args.tp} -m verl_mega generate ... --tp {args.tp}`")


def check_lengths(args, prompts: list) -> None:
    """ValueError naming --max-new-tokens when the longest prompt (tokenized with --model's tokenizer; an image's
    pad tokens not counted) plus --max-new-tokens exceeds the model's max_position_embeddings (config.json)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.tokenizer import load_tokenizer
    from verl_mega.rollout.frontend import encode_prompts

    limit = ModelConfig.from_hf(args.model).max_position_embeddings
    where = f"the model's max_position_embeddings={limit} (--model {args.model})"
    if args.max_new_tokens >= limit:  # no prompt (of >= 1 token) fits: no need to tokenize
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within {where}; "
                         f"use --max-new-tokens < {limit} minus the prompt length")
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        return  # prompts read from a file need a tokenizer: generate() says it is missing
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    longest = max(lengths)
    if longest + args.max_new_tokens > limit:
        fix = (f"use --max-new-tokens <= {limit - longest}" if longest < limit else
               f"row {lengths.index(longest)} alone is {longest} tokens: shorten the prompts")
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} with the longest prompt of {args.prompts} "
                         f"({longest} tokens) exceeds {where}; {fix}")


def encode_images(actor, path: str, records: list[dict], prompts: list, prompt_key: str) -> tuple[list, list | None]:
    """(prompts, images) for `frontend.generate`: rows with a non-empty "images" column become token ids
    (their `prompt_key` messages templated, markers replaced, image pads expanded) with their (pixel_values,
    image_grid_thw); images is None when no row has any. ValueError naming the file and row for a bad image,
    a text model given images, or (a vision-language model) `<image>` markers without as many images."""
    from pathlib import Path

    from verl_mega.data.dataset import row_messages
    from verl_mega.data.multimodal import check_image_column, count_markers, encode_vision_prompt
    from verl_mega.trainer.vision_data import image_processor_for

    rows = [i for i, rec in enumerate(records) if rec.get("images") is not None and len(rec["images"])]
    if rows and not actor.config.is_vlm:
        raise ValueError(f"{path}: row {rows[0]} has images but the model at {actor.path} is a text model")
    if actor.config.is_vlm:  # <image> markers without images are an error, as in training (not literal text)
        with_images = set(rows)
        rows = [i for i, rec in enumerate(records) if i in with_images or count_markers(row_messages(rec, prompt_key))]
    if not rows:
        return prompts, None
    processor = image_processor_for(actor.path, actor.config)
    prompts, images = list(prompts), [None] * len(prompts)
    for i in rows:
        try:
            messages = row_messages(records[i], prompt_key)
            check_image_column(records[i], "images", messages)
            enc = encode_vision_prompt(actor.tokenizer, processor, messages, records[i].get("images"),
                                       base_dir=Path(path).parent)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: row {i}: {exc}") from None
        prompts[i], images[i] = enc["prompt_ids"], (enc["pixel_values"], enc["image_grid_thw"])
    return prompts, images


def _generate_share(actor, prompts: list, images: list | None, args) -> list[list[dict]]:
    """This replica's results: for each of its prompts, the list of n sample dicts."""
    from verl_mega.rollout.frontend import generate

    out = []
    for b, start in enumerate(range(0, len(prompts), args.batch_size)):
        batch = slice(start, start + args.batch_size)
        samples = generate(actor, prompts[batch], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, n=args.n,
                           seed=args.seed + b, max_batch=args.batch_size * args.n,
                           use_cuda_graph=False if args.no_cuda_graph else None,
                           images=None if images is None else images[batch])
        out += [samples[i * args.n:(i + 1) * args.n] for i in range(len(samples) // args.n)]
    return out


def output_image(entry):
    """An image entry as written to the output: {"bytes": b, ...} -> {"path": its path or None, "num_bytes": len(b)}
    (json would write str(b): neither small nor decodable; the pixels stay in the input file); others as given."""
    if isinstance(entry, dict) and isinstance(entry.get("bytes"), (bytes, bytearray)):
        return {"path": entry.get("path"), "num_bytes": len(entry["bytes"])}
    return entry


def output_line(row: dict, samples: list[dict]) -> dict:
    """The output object of one input row and its n samples (the schema in the module docstring)."""
    images = row.get("images")
    if isinstance(images, (list, tuple)):
        row = {**row, "images": [output_image(e) for e in images]}
    return {**row, "responses": [s["response"] for s in samples], "response_ids": [s["response_ids"] for s in samples]}


def run(args) -> int:
    """Load the model, generate this replica's share, gather on rank 0 and write the output."""
    from verl_mega.rollout.actor import get_actor_model

    _check_args(args)
    check_layout(args, dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1)))
    records, prompts = read_prompts(args.prompts, args.prompt_key)  # every rank validates before any collective
    check_lengths(args, prompts)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    actor = get_actor_model(args.model, torch_dtype=dtype, tensor_parallel_size=args.tp, pipeline_parallel_size=1)
    # every rank, before any collective
    prompts, images = encode_images(actor, args.prompts, records, prompts, args.prompt_key)
    layout = actor.layout
    share = -(-len(records) // layout.dp)
    mine = slice(layout.dp_rank * share, (layout.dp_rank + 1) * share)
    t0 = time.perf_counter()
    results = _generate_share(actor, prompts[mine], None if images is None else images[mine], args) \
        if prompts[mine] else []
    elapsed = time.perf_counter() - t0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((layout.dp_rank, layout.tp_rank, results), gathered, dst=0)
    if dist.get_rank() != 0:
        return 0
    ordered = [res for dp_rank, tp_rank, res in sorted(gathered) if tp_rank == 0]
    all_results = [r for res in ordered for r in res]
    assert len(all_results) == len(records), (len(all_results), len(records))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for rec, samples in zip(records, all_results):
            f.write(json.dumps(output_line(rec, samples), ensure_ascii=False, default=str) + "\n")
    tokens = sum(len(s["response_ids"]) for samples in all_results for s in samples)
    print(f"verl-mega generate: {len(records)} prompts x {args.n} -> {args.out} ({tokens} tokens, "
          f"{elapsed:.1f} s on rank 0's replica)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `verl-mega generate`; returns the exit status (2 for bad input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the message
        return int(exc.code or 0)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"verl-mega generate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
