"""verl_mega.rollout: batched generation (static KV cache, sampling, n samples, CUDA-graph decode).

    from verl_mega.rollout import generate, GenerationEngine
    results = generate(actor, ["Hello", [{"role": "user", "content": "2+2?"}]], max_new_tokens=64, n=4)
    engine = GenerationEngine(model, tp_group, max_batch=64, max_seq_len=1024, eos_token_ids=[2], pad_token_id=0)
    out = engine.generate(prompt_token_ids, max_new_tokens=128, temperature=1.0, n=4, seed=0)  # GenerationOutput

`verl-mega generate` (verl_mega/apps/generate_cli.py) runs it over a jsonl file.
"""

from verl_mega.rollout.engine import GenerationEngine, GenerationOutput
from verl_mega.rollout.frontend import encode_prompts, generate, release
from verl_mega.rollout.kv_cache import StaticKVCache
from verl_mega.rollout.sampling import SamplingParams, gather_vocab_logits, sample_tokens

__all__ = [
    "GenerationEngine", "GenerationOutput", "SamplingParams", "StaticKVCache", "encode_prompts",
    "gather_vocab_logits", "generate", "release", "sample_tokens",
]
