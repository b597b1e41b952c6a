"""The engine's vision-tower calls: one per prefill forward over the images of its prompts (every prompt admitted
together, up to the prefill's `prefill_tokens` slice), never one per prompt, per sample or per recompute (rollout/images.py), on a tiny random Qwen2.5-VL in fp32.

The tower is counted by wrapping the model's real `encode_images` (the wrapper records the grid it is given and
returns the real embeddings), so the generations below are the real ones; that they still equal transformers'
token for token is tests/rollout/test_vlm_generation.py's job.

Tolerance of batched vs per-prompt embeddings (fp32): attention runs per window / per image (cu_seqlens; on CPU
one SDPA call per window, the same shapes either way) and norms and element-wise ops act per row, so a prompt's
rows depend on the other images only through the shapes of the GEMMs (patch embedding, qkv, proj, MLP, merger:
M = all the patches of the call), which may change the order of their K-long sums. Two orders of a K-term sum
differ by at most 2 * gamma_K * sum|a_i b_i| ~ 2 * K * u * sum|a_i b_i| (Higham, Accuracy and Stability of
Numerical Algorithms, eq. 3.5; u = 2^-24); the tiny tower's activations are O(1) after each RMSNorm, so one GEMM
moves its output by at most ~2 * K * u * max|out| relative, and the GEMMs in sequence add up (no amplification
beyond O(1) through the normed blocks): |batched - alone| <= 2 * u * sum(K over the sequential GEMMs) *
max|alone| ~ 6e-4 here (sum K = 1864, dominated by the patch embedding's 1176). Measured: ~1e-6 (a few ulps).
A mixing bug (a row given to the wrong prompt, attention leaking across images) moves rows by O(1), and the test
checks that different images' rows are that far apart.
"""

import pytest
import torch

from verl_mega.models import ModelConfig, build_stage, load_hf_weights
from verl_mega.parallel import Layout
from verl_mega.rollout.engine import GenerationEngine
from verl_mega.rollout.engine_config import EngineConfig
from verl_mega.rollout.images import PromptImages, encode_pending
from verl_mega.rollout.scheduler import RequestParams
from verl_mega.testing.tiny_vlm import TINY_VLM_DEFAULTS, make_tiny_qwen2_5_vl
from verl_mega.testing.vlm_prompts import image_prompts

FP32_U = 2.0**-24  # fp32 unit roundoff
NEVER, MAX_NEW = 10_000, 8  # an "EOS" outside the vocabulary: rows run to MAX_NEW
GRIDS = [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], [], [(1, 8, 8)]]  # per prompt: images (t, h, w) in patches
IMAGES = sum(len(g) for g in GRIDS)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(model config, loaded fp32 stage, prompts, images) of a tiny random Qwen2.5-VL."""
    path = str(tmp_path_factory.mktemp("tiny_vl_batch"))
    make_tiny_qwen2_5_vl(path, seed=1)
    config = ModelConfig.from_hf(path)
    model = build_stage(config, Layout.create(tp=1, pp=1), init_seed=None)
    load_hf_weights(model, path)
    prompts, images = image_prompts(config, GRIDS)
    return config, model.eval(), prompts, images


def _counted_engine(model, monkeypatch, **kw) -> tuple[GenerationEngine, list[torch.Tensor]]:
    """An engine on `model` whose vision-tower calls are recorded (the grid of each call); the real tower runs."""
    config = EngineConfig(**{"max_batch": 8, "max_seq_len": 64, "max_tokens": 1024, "block_size": 4,
                             "kv_len_bucket": 16, **kw})
    calls, encode = [], type(model).encode_images  # the real method (not an earlier test's wrapper)

    def counting(pixel_values, image_grid_thw):
        calls.append(image_grid_thw.clone())
        return encode(model, pixel_values, image_grid_thw)

    monkeypatch.setattr(model, "encode_images", counting, raising=False)  # this model only; undone after the test
    return GenerationEngine(model, None, config, eos_token_ids=[NEVER], pad_token_id=0), calls


@pytest.mark.parametrize("share_prefix", [True, False])
def test_one_tower_call_for_all_prompts_admitted_together(case, share_prefix, monkeypatch):
    """4 prompts (2, 1, 0 and 1 images) x 2 samples fit one admission: one tower call on the 4 images in prompt
    order, whether the samples prefill as one group (share_prefix) or as separate groups sharing the encoding."""
    _, model, prompts, images = case
    engine, calls = _counted_engine(model, monkeypatch, share_prefix=share_prefix)
    out = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images)
    assert len(calls) == 1
    assert torch.equal(calls[0], torch.cat([im[1] for im in images if im is not None]))
    responses = out.responses()
    assert all(len(r) == MAX_NEW for r in responses)
    assert all(responses[2 * i] == responses[2 * i + 1] for i in range(len(prompts)))  # greedy: samples agree


def test_each_prompt_encoded_once_across_admissions_and_preemption(case, monkeypatch):
    """Admission over several steps (2 rows at a time) encodes each prompt when it is admitted, once; a KV
    budget that forces preemption recomputes samples without encoding their images again."""
    _, model, prompts, images = case
    stepwise, calls = _counted_engine(model, monkeypatch, max_batch=2)
    ref = stepwise.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses()
    assert [c.tolist() for c in calls] == [[list(g) for g in grids] for grids in GRIDS if grids]
    tight, calls = _counted_engine(model, monkeypatch, max_seq_len=40, max_tokens=44)
    out = tight.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses()
    assert tight.scheduler.preemptions > 0, "the KV budget was meant to force a preemption"
    assert sum(len(c) for c in calls) == IMAGES
    assert out == ref


def test_tower_batch_follows_the_prefill_slices(case, monkeypatch):
    """A prefill split by prefill_tokens (here one prompt per forward: the budget is below two prompts' padded
    tokens) encodes each forward's images just before it: one call per prompt with images, same greedy output."""
    _, model, prompts, images = case
    whole, _ = _counted_engine(model, monkeypatch)
    ref = whole.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses()
    sliced, calls = _counted_engine(model, monkeypatch, prefill_tokens=min(len(p) for p in prompts))
    out = sliced.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses()
    assert [c.tolist() for c in calls] == [[list(g) for g in grids] for grids in GRIDS if grids]
    assert out == ref


def test_batched_embeddings_equal_per_prompt_embeddings(case):
    """`encode_pending` over all prompts at once gives each prompt the rows a call on its images alone gives
    (tolerance: module docstring), drops the pixel values, and never encodes an entry twice."""
    config, model, prompts, images = case
    pairs = [(p, im) for p, im in zip(prompts, images) if im is not None]
    alone = [PromptImages.prepare(model, p, *im) for p, im in pairs]
    for entry in alone:
        assert encode_pending(model, [entry]) == 1
    batched = [PromptImages.prepare(model, p, *im) for p, im in pairs]
    assert encode_pending(model, batched + batched[:1]) == len(batched)  # listed twice, encoded once
    assert encode_pending(model, batched) == 0  # nothing left to encode: no tower call
    assert all(entry.pixel_values is None for entry in batched)

    d = TINY_VLM_DEFAULTS
    patch_k = 3 * d["temporal_patch_size"] * d["patch_size"] ** 2  # the patch embedding's depth (C*T*P*P)
    block_k = 3 * d["vision_hidden_size"] + d["vision_intermediate_size"]  # qkv, proj, gate/up, down
    merger_k = 2 * d["vision_hidden_size"] * d["spatial_merge_size"] ** 2
    sum_k = patch_k + d["vision_depth"] * block_k + merger_k
    scale = max(entry.embeds.abs().max().item() for entry in alone)
    tol = 2 * FP32_U * sum_k * scale
    for a, b in zip(alone, batched):
        assert a.embeds.shape == b.embeds.shape == (a.num_embeds, config.hidden_size)
        torch.testing.assert_close(b.embeds, a.embeds, rtol=0.0, atol=tol)
    apart = (alone[1].embeds - alone[0].embeds[:alone[1].num_embeds]).abs().max().item()
    assert apart > 100 * tol, "different images must be far apart for the tolerance to catch mixed rows"


def test_bad_pixel_values_are_refused_when_the_request_is_added(case):
    """Encoding moved to admission, the tower's input checks did not: a grid that does not fit the pixel values
    is a ValueError from add_request, before anything is queued."""
    _, model, prompts, images = case
    engine = GenerationEngine(model, None, EngineConfig(max_batch=8, max_seq_len=64, max_tokens=1024, block_size=4),
                              eos_token_ids=[NEVER], pad_token_id=0)
    pixel_values, grid = images[1]
    with pytest.raises(ValueError, match="pixel_values has shape"):
        engine.add_request(prompts[1], RequestParams(max_new_tokens=MAX_NEW), pixel_values=pixel_values[:-1],
                           image_grid_thw=grid)
    assert not engine.has_unfinished()
