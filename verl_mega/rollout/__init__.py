"""verl_mega.rollout: the rollout service (RolloutWorker, continuous-batching engine over a paged KV
cache, sampling) and the actor handle that uses it.

    from verl_mega.rollout import get_actor_model, generate
    actor = get_actor_model("path/to/hf_dir")                    # HFActor: .model, .layout, .tokenizer
    results = actor.generate(["Hello", [{"role": "user", "content": "2+2?"}]], max_new_tokens=64, n=4)
    engine = GenerationEngine(model, tp_group, EngineConfig(max_batch=64), eos_token_ids=[2])
    rid = engine.add_request(prompt_ids, RequestParams(max_new_tokens=128, n=4)); engine.step()

`verl-mega generate` (verl_mega/apps/generate_cli.py) runs it over a jsonl file. Names are imported
on first use (PEP 562), so `verl_mega.rollout.engine_config` (read by the trainer's config schema)
loads without torch.
"""

import importlib

_EXPORTS = {
    "HFActor": "verl_mega.rollout.actor", "get_actor_model": "verl_mega.rollout.actor",
    "EngineConfig": "verl_mega.rollout.engine_config",
    "GenerationEngine": "verl_mega.rollout.engine",
    "GenerationOutput": "verl_mega.rollout.output",
    "encode_prompts": "verl_mega.rollout.frontend", "generate": "verl_mega.rollout.frontend",
    "release": "verl_mega.rollout.frontend", "stop_ids": "verl_mega.rollout.frontend",
    "PagedKVCache": "verl_mega.rollout.kv_cache",
    "RequestParams": "verl_mega.rollout.scheduler", "Finished": "verl_mega.rollout.scheduler",
    "RolloutWorker": "verl_mega.rollout.worker", "RolloutResult": "verl_mega.rollout.worker",
    **{name: "verl_mega.rollout.sampling" for name in ("SamplingParams", "gather_vocab_logits", "sample_tokens")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'verl_mega.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
