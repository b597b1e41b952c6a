"""Text in, text out: `generate(actor, prompts)` on an `HFActor` with the GenerationEngine.

What: tokenizes prompts (plain strings with the tokenizer's default special tokens; chat message
lists through the tokenizer's chat template with the generation prompt; or ready token-id lists),
runs this rank's tensor-parallel group's engine, decodes the responses. One engine per actor is
kept (weakly, dropped with the actor) so its KV cache and CUDA graphs are reused between calls;
`release(actor)` frees them.

Stop tokens: the tokenizer's EOS plus the `eos_token_id`s of the model's config.json and
generation_config.json (as transformers' generate does). Pad: the tokenizer's pad id, else EOS.

Pipelined actors (pp > 1): the HybridEngine (verl_mega.hybrid_engine) reshards the weights into a
one-stage inference model for the call and releases it afterwards.
"""

from __future__ import annotations

import json
import os
import weakref

from verl_mega.models.tokenizer import encode_text
from verl_mega.rollout.engine import GenerationEngine

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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


def get_engine(actor, *, max_batch: int, max_seq_len: int, use_cuda_graph: bool | None = None) -> GenerationEngine:
    """The actor's cached engine if it is big enough, else a new one (replacing the cached one)."""
    if actor.layout.pp != 1 or not (actor.model.has_embedding and actor.model.has_head):
        raise ValueError(f"get_engine needs a one-stage actor (pp=1), this one has pp={actor.layout.pp}")
    engine = _ENGINES.get(actor)
    if (engine is None or engine.max_batch < max_batch or engine.max_seq_len < max_seq_len
            or (use_cuda_graph is not None and use_cuda_graph != engine.use_cuda_graph)):
        if engine is not None:
            engine.release()
        eos, pad = stop_ids(actor)
        max_seq_len = max(max_seq_len, engine.max_seq_len if engine is not None else 0)
        engine = GenerationEngine(actor.model, actor.layout.tp_group, max_batch=max_batch, max_seq_len=max_seq_len,
                                  eos_token_ids=eos, pad_token_id=pad, use_cuda_graph=use_cuda_graph)
        _ENGINES[actor] = engine
    return engine


def release(actor) -> None:
    """Free the KV cache and CUDA graphs of the actor's engine (e.g. before training resumes)."""
    engine = _ENGINES.pop(actor, None)
    if engine is not None:
        engine.release()


def generate(actor, prompts, *, max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, n: int = 1, seed: int = 0, stop_token_ids=(), ignore_eos: bool = False,
             max_batch: int | None = None, use_cuda_graph: bool | None = None) -> list[dict]:
    """Generate n responses per prompt with `actor` (an HFActor); collective over its model-parallel group,
    whose ranks all pass the same prompts.

    Returns len(prompts) * n dicts, prompt-major (rows i*n .. i*n+n-1 answer prompt i):
    {"prompt": the prompt as given, "prompt_index": i, "sample_index": j, "response": decoded text
    (special tokens skipped), "response_ids": token ids (the stop token included),
    "response_logprobs": per-token log-probs (see verl_mega.rollout.sampling)}.
    With pp > 1 the HybridEngine builds a one-stage inference model (tp_g = tp); its pp replicas
    inside the model-parallel group each generate a share of the prompts, then all-gather.
    """
    if actor.tokenizer is None and not all(isinstance(p, (list, tuple)) and p and isinstance(p[0], int) for p in prompts):
        raise ValueError(f"the model at {actor.path} has no tokenizer: pass token-id lists as prompts")
    ids = encode_prompts(actor.tokenizer, prompts)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, n=n,
              stop_token_ids=stop_token_ids, seed=seed, ignore_eos=ignore_eos)
    rows = len(ids) * (n if isinstance(n, int) and n > 0 else 1)
    max_seq_len = -(-(max(len(p) for p in ids) + max_new_tokens) // 64) * 64
    if actor.layout.pp == 1:
        engine = get_engine(actor, max_batch=max_batch or min(rows, 256), max_seq_len=max_seq_len,
                            use_cuda_graph=use_cuda_graph)
        out = engine.generate(ids, **kw)
        responses, logprobs = out.responses(), [lp[:len(r)].tolist() for lp, r in zip(out.response_logprobs, out.responses())]
    else:
        responses, logprobs = _generate_pipelined(actor, ids, kw, max_batch or min(rows, 256), max_seq_len, use_cuda_graph)
    results = []
    for r, resp in enumerate(responses):
        i, j = divmod(r, n)
        text = actor.tokenizer.decode(resp, skip_special_tokens=True) if actor.tokenizer is not None else None
        results.append({"prompt": prompts[i], "prompt_index": i, "sample_index": j, "response": text,
                        "response_ids": resp, "response_logprobs": logprobs[r]})
    return results


def _generate_pipelined(actor, ids, kw, max_batch, max_seq_len, use_cuda_graph):
    """pp > 1: reshard to a one-stage inference model, split prompts over its micro-DP replicas,
    all-gather the (responses, logprobs) rows. The engine is not cached: the inference weights are
    rebuilt (new storage) by every reshard, which would invalidate captured CUDA graphs."""
    import torch.distributed as dist

    from verl_mega.hybrid_engine.reshard import inference_model

    eos, pad = stop_ids(actor)
    with inference_model(actor, actor.layout) as (model, inf):
        share = -(-len(ids) // inf.micro_dp)
        mine = ids[inf.micro_dp_rank * share:(inf.micro_dp_rank + 1) * share]
        local = ([], [])
        if mine:
            engine = GenerationEngine(model, inf.tp_g_group, max_batch=max_batch, max_seq_len=max_seq_len,
                                      eos_token_ids=eos, pad_token_id=pad, use_cuda_graph=use_cuda_graph)
            try:
                out = engine.generate(mine, **kw)
            finally:
                engine.release()
            resp = out.responses()
            local = (resp, [lp[:len(r)].tolist() for lp, r in zip(out.response_logprobs, resp)])
        gathered = [None] * inf.micro_dp
        dist.all_gather_object(gathered, (inf.micro_dp_rank, local), group=inf.micro_dp_group)
    responses, logprobs = [], []
    for _, (resp, lps) in sorted(gathered, key=lambda g: g[0]):
        responses += resp
        logprobs += lps
    return responses, logprobs
