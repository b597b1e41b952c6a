"""Text in, text out: `generate(actor, prompts)` on an `HFActor` through its RolloutWorker.

What: tokenizes prompts (plain strings with the tokenizer's default special tokens; chat message
lists through the tokenizer's chat template with the generation prompt; or ready token-id lists),
runs the actor's RolloutWorker (`actor.rollout_worker()`: the HybridEngine hand-over for pp > 1,
one cached generation engine, the split over inference replicas), decodes the responses.
`release(actor)` frees the engine's KV cache and CUDA graphs.

Stop tokens: the tokenizer's EOS plus the `eos_token_id`s of the model's config.json and
generation_config.json (as transformers' generate does). Pad: the tokenizer's pad id, else EOS.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from verl_mega.data.text import encode_text
from verl_mega.rollout.sampling import SamplingParams


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: str -> `encode_text` (with the tokenizer's BOS, as the dataset tokenises
    training prompts); list of {"role", "content"} dicts -> chat template with add_generation_prompt;
    list of ints -> as is. ValueError names the bad prompt."""
    if isinstance(prompts, (str, dict)):
        raise ValueError("prompts must be a list (of strings, chat message lists or token-id lists)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = encode_text(tokenizer, p)
        elif isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) for m in p):
            if any("role" not in m or "content" not in m for m in p):
                raise ValueError(f"prompt {i}: every chat message needs 'role' and 'content' keys")
            text = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
            ids = encode_text(tokenizer, text, templated=True)
        elif isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p):
            ids = list(p)
        else:
            raise ValueError(f"prompt {i} is neither a string, a non-empty chat message list nor a token-id list: {p!r:.80}")
        if len(ids) == 0:
            raise ValueError(f"prompt {i} tokenizes to no tokens")
        out.append(list(ids))
    return out


def _config_eos(path: str | None) -> list[int]:
    ids = []
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name) if path else None
        if file and os.path.exists(file):
            with open(file) as f:
                eos = json.load(f).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
    return ids


def stop_ids(actor) -> tuple[list[int], int]:
    """(eos token ids, pad token id) of an actor (tokenizer + config files)."""
    tok = actor.tokenizer
    eos = ([tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else []) + _config_eos(actor.path)
    eos = sorted(set(int(e) for e in eos))
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, int(pad)


def release(actor) -> None:
    """Free the KV cache and CUDA graphs of the actor's rollout engine (e.g. before training resumes)."""
    actor.release_rollout()


def generate(actor, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, n: int = 1, seed: int = 0, stop_token_ids=(), ignore_eos: bool = False,
             max_batch: int | None = None, use_cuda_graph: bool | None = None, images: list | None = None) -> list[dict]:
    """Generate n responses per prompt with `actor` (an HFActor); collective over its model-parallel group,
    whose ranks all pass the same prompts.

    Returns len(prompts) * n dicts, prompt-major (rows i*n .. i*n+n-1 answer prompt i):
    {"prompt": the prompt as given, "prompt_index": i, "sample_index": j, "response": decoded text
    (special tokens skipped), "response_ids": token ids (the stop token included),
    "response_logprobs": per-token log-probs (see verl_mega.rollout.sampling)}.
    max_batch: most sequences decoded together, use_cuda_graph: False turns CUDA-graph decode off; both
    override the worker's engine config for this call only (None: keep it; see `actor.rollout_worker()`).
    With pp > 1 the actor's HybridEngine builds a one-stage inference model (tp_g = tp); its micro-DP
    replicas each generate a share of the prompts, then all-gather.
    images: for a vision-language model, one entry per prompt: None (text) or (pixel_values [N_patches, D],
    image_grid_thw [N_images, 3]) as the processor gives them for that prompt (its image-pad tokens expanded).
    """
    if actor.tokenizer is None and not all(isinstance(p, (list, tuple)) and p and isinstance(p[0], int) for p in prompts):
        raise ValueError(f"the model at {actor.path} has no tokenizer: pass token-id lists as prompts")
    ids = encode_prompts(actor.tokenizer, prompts)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    worker = actor.rollout_worker()
    if max_batch is not None or use_cuda_graph is not None:  # a per-call override of the worker's engine config
        config = worker.engine_config
        config = replace(config, max_batch=max_batch or config.max_batch,
                         cuda_graph=config.cuda_graph if use_cuda_graph is None else use_cuda_graph)
    else:
        config = None
    out = worker.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, n=n, seed=seed,
                          stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, engine_config=config, images=images)
    results = []
    for r, (resp, lps) in enumerate(zip(out.responses, out.logprobs)):
        i, j = divmod(r, n)
        text = actor.tokenizer.decode(resp, skip_special_tokens=True) if actor.tokenizer is not None else None
        results.append({"prompt": prompts[i], "prompt_index": i, "sample_index": j, "response": text,
                        "response_ids": resp, "response_logprobs": lps})
    return results
