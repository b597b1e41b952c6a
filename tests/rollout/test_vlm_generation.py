"""Generation with images: the continuous-batching engine on a tiny random Qwen2.5-VL against transformers'
`Qwen2_5_VLForConditionalGeneration.generate(do_sample=False)`, token for token, at tp 1 (in-process: 2
samples per prompt share one encoding and the prompt's blocks; a 2-row budget for 4 rows: continuous
batching; a KV budget that forces preemption: the recompute re-feeds the image embeddings) and, in one gloo
spawn, at tp 2, at tp 2 generating at tp_g 1 and at pp 2 (the HybridEngine hands the vision tower over).

The batch mixes a prompt with two images of different sizes, one with one image and a text-only prompt,
so prefill rows with and without images, different M-RoPE deltas and text positions share decode steps.
Both sides suppress the image / video pad tokens (our engine never samples them: rollout/images.py).
Tolerance: tokens exact (fp32, random weights: ties between the two implementations' argmax would need
logits equal to ~1e-6, which the tiny model's spread makes improbable; the case is fixed by the seed).
"""

import pytest
import torch

from verl_mega.testing.multiprocess import run_distributed
from verl_mega.testing.vlm_prompts import image_prompts

MAX_NEW = 8
NEVER = 10_000  # an "EOS" outside the vocabulary: rows run to MAX_NEW
GRIDS = [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], []]  # per prompt: images (t, h, w) in patches


def hf_greedy_vlm(path: str, prompts, images, suppress) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), MAX_NEW tokens, the pad tokens
    `suppress` (image pad first) never generated."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids, img in zip(prompts, images):
        x = torch.tensor([ids])
        # mm_token_type_ids (as the processor returns it) makes transformers compute the M-RoPE positions
        kw = {} if img is None else {"pixel_values": img[0], "image_grid_thw": img[1],
                                     "mm_token_type_ids": (x == suppress[0]).int()}
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=NEVER, pad_token_id=0, suppress_tokens=suppress,
                             top_k=None, top_p=None, temperature=None, **kw)
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def vlm_case(tmp_path_factory):
    """A tiny random Qwen2.5-VL directory, the prompts and transformers' greedy responses."""
    import json
    import os

    from verl_mega.models.config import ModelConfig
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    path = str(tmp_path_factory.mktemp("tiny_vl"))
    make_tiny_qwen2_5_vl(path, seed=1)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    prompts, images = image_prompts(ModelConfig.from_hf(path), GRIDS)
    suppress = [config["image_token_id"], config["video_token_id"]]
    return {"path": path, "prompts": prompts, "images": images, "ref": hf_greedy_vlm(path, prompts, images, suppress),
            "config": config}


def _engine(path: str, tp: int = 1, **kw):
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import load_hf_weights
    from verl_mega.models.parallelize import build_stage
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.engine import GenerationEngine
    from verl_mega.rollout.engine_config import EngineConfig

    layout = Layout.create(tp=tp, pp=1)
    model = build_stage(ModelConfig.from_hf(path), layout, init_seed=None)
    load_hf_weights(model, path)
    config = EngineConfig(**{"max_batch": 8, "max_seq_len": 96, "max_tokens": 1024, "block_size": 4,
                             "kv_len_bucket": 16, **kw})
    return GenerationEngine(model.eval(), layout.tp_group, config, eos_token_ids=[NEVER], pad_token_id=0)


def test_greedy_with_images_matches_transformers_tp1(vlm_case):
    prompts, images, ref = vlm_case["prompts"], vlm_case["images"], vlm_case["ref"]
    engine = _engine(vlm_case["path"])
    calls = []
    encode = engine.model.encode_images

    def counting(*args, **kw):
        calls.append(1)
        return encode(*args, **kw)

    engine.model.encode_images = counting
    out = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images)
    assert out.responses() == [r for r in ref for _ in range(2)]
    assert len(calls) == 1  # every prompt admitted in one step: one tower call, shared by the 2 samples of each
    # continuous batching (2 rows at a time) and preemption (a pool too small for every row) change nothing
    small = _engine(vlm_case["path"], max_batch=2)
    assert small.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, images=images).responses() == ref
    tight = _engine(vlm_case["path"], max_seq_len=40, max_tokens=64)
    assert tight.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses() == \
        [r for r in ref for _ in range(2)]
    assert tight.scheduler.preemptions > 0, "the KV budget was meant to force a preemption"


def test_image_inputs_are_checked(vlm_case):
    engine = _engine(vlm_case["path"])
    prompts, images = vlm_case["prompts"], vlm_case["images"]
    with pytest.raises(ValueError, match="image-pad tokens"):
        engine.generate([prompts[1]], max_new_tokens=2, temperature=0.0)  # pads without pixel_values
    pixel_values, grid = images[1]
    with pytest.raises(ValueError, match="vision embeddings"):
        engine.generate([prompts[1]], max_new_tokens=2, images=[(pixel_values, grid * torch.tensor([1, 2, 1]))])
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(prompts, max_new_tokens=2, images=images[:1])


def _tp2_and_pp2(path, prompts, images):
    """Greedy responses of `actor.generate` at tp 2 (vision tower replicated), at tp 2 generating at tp_g 1 and
    at pp 2 (the HybridEngine hands the tower over: regathered from the first stage, or taken from one TP rank)."""
    from verl_mega.rollout.actor import get_actor_model

    out = {}
    for tp, pp, tp_g in ((2, 1, 2), (2, 1, 1), (1, 2, 1)):
        actor = get_actor_model(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        actor.rollout_worker(tp_g=tp_g)
        res = actor.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, images=images)
        out[(tp, pp, tp_g)] = [r["response_ids"] for r in res]
    return out


def test_greedy_with_images_matches_transformers_tp2_tpg1_pp2(vlm_case):
    results = run_distributed(_tp2_and_pp2, 2, vlm_case["path"], vlm_case["prompts"], vlm_case["images"])
    for rank in results:
        for layout, responses in rank.items():
            assert responses == vlm_case["ref"], layout
