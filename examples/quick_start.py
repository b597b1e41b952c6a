"""Quick start: one RL step on a tiny local model, as one plain CPU process (no torchrun, no downloads).

    python examples/quick_start.py

The same script runs unchanged under `torchrun --nproc-per-node 2 examples/quick_start.py` with
`get_actor_model(path, tensor_parallel_size=2)`. With a real model, point `get_actor_model` at its
Hugging Face directory (e.g. Qwen2.5-0.5B-Instruct) and use torch_dtype=torch.bfloat16.
"""

import tempfile

from verl_mega.rollout import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer import PPOTrainer

with tempfile.TemporaryDirectory() as tmp:
    path = make_tiny_hf_model(tmp)  # random tiny Llama + character tokenizer with a chat template
    actor = get_actor_model(path)
    trainer = PPOTrainer(
        actor=actor,
        reward_fn=lambda response: float("120" in response),
        rollout_batch_size=1,
        num_epochs=1,
        max_new_tokens=32,
    )
    sample = {
        "prompt": [{"role": "user", "content": "What is 10*12?"}],
        "extra_info": {"answer": "120"},
    }
    metrics = trainer.step([sample])
    # 3 significant digits: a learning rate of 1e-6 prints as 1e-06 (metric names: docs/metrics.md)
    print({k: float(f"{v:.3g}") for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))})
    print("responses:", trainer.last_batch.response_texts)
