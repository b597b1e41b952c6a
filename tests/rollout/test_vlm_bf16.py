"""The VLM paths in bf16 (params_dtype=torch.bfloat16), as a GPU runs them, checked on CPU.

A tiny random Qwen2.5-VL (3 vision blocks, 2 text layers) loaded in bf16 on both sides, our stage and
transformers' `Qwen2_5_VLForConditionalGeneration(dtype=bfloat16)`, fed fp32 pixel values (as the
processor returns them; both cast them to the conv's dtype):
- the vision tower, and the forward with images (left-padded rows with 0, 1, 2 images), against transformers;
- greedy generation with images through the engine, against transformers' bf16 greedy and our fp32 engine;
- one GRPO step with images (the vision tower trains, stays bf16, the loss is finite).
And the parts of the GPU paths a CPU can pin: the decode step (CUDA-graph captured on a GPU) reads only the
engine's static buffers, the M-RoPE delta buffer included, and no tensor value on the host; a prefill chunk
takes its image rows as a slice.

Tolerance (bf16 against bf16): both implementations round every op to bf16 (unit roundoff u = 2^-8) but
not always at the same places (a linear's bias added inside or after the matmul, fused vs split qkv,
SDPA vs our masked attention), so each layer adds a relative difference of order u on its O(1)
activations, and the differences of `depth` layers add up: |ours - theirs| <= 2 * depth * u * max|ref|
(2: both sides round independently). Depth 3 for the tower, 5 (3 vision + 2 text) for the logits:
~0.02 on the tower's O(2.5) output, ~0.16 on O(4) logits. A dtype bug is larger: the same model in
fp32 differs from either bf16 side by ~0.09 at the logits, and a wrong rotary axis or image row by O(1)
(tests/models/test_vlm.py); the fp32-vs-bf16 gap is asserted to be no smaller than ours-vs-transformers.
"""

import math

import pytest
import torch

from verl_mega.models import ModelConfig, build_stage, load_hf_weights
from verl_mega.models.mrope import mrope_position_ids
from verl_mega.parallel import Layout
from verl_mega.testing.tiny_vlm import TINY_VLM_DEFAULTS, make_tiny_qwen2_5_vl, tiny_vlm_batch
from verl_mega.testing.vlm_prompts import image_prompts

BF16_U = 2.0**-8  # bf16 unit roundoff (8 significand bits)
VISION_DEPTH, TEXT_DEPTH = TINY_VLM_DEFAULTS["vision_depth"], TINY_VLM_DEFAULTS["num_layers"]
IMG, VS = TINY_VLM_DEFAULTS["image_token_id"], TINY_VLM_DEFAULTS["vision_start_token_id"]
NEVER, MAX_NEW = 10_000, 8  # an "EOS" outside the vocabulary: rows run to MAX_NEW
GRIDS = [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], []]  # per prompt: images (t, h, w) in patches


def bf16_tol(depth: int, scale: float) -> float:
    """Bound on |ours - transformers| in bf16 after `depth` layers on outputs of magnitude `scale` (docstring)."""
    return 2 * depth * BF16_U * scale


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vlm_bf16"), seed=3)


def _stage(path, dtype):
    stage = build_stage(ModelConfig.from_hf(path), Layout.create(1, 1), params_dtype=dtype, init_seed=None)
    load_hf_weights(stage, path)
    return stage.eval()


def _hf(path, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def _forward(stage, hf, batch):
    """(our tower output, transformers', our logits at real tokens, transformers'), all as fp32."""
    ids, mask, pv, grid = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]
    pos, _ = mrope_position_ids(ids, grid, mask, image_token_id=IMG, vision_start_token_id=VS, spatial_merge_size=2)
    ours_v = stage.encode_images(pv, grid)  # fp32 pixels into the bf16 tower: cast by the patch embedding
    ref_v = torch.cat(hf.model.get_image_features(pv.to(hf.dtype), grid).pooler_output)
    ours = stage(ids, pos, mask, pixel_values=pv, image_grid_thw=grid)[..., :stage.true_vocab_size]
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv.to(hf.dtype), image_grid_thw=grid,
             mm_token_type_ids=(ids == IMG).int()).logits
    real = mask.bool()
    assert ours_v.dtype == ours.dtype == stage.embed_tokens.weight.dtype
    return ours_v.float(), ref_v.float(), ours.float()[real], ref.float()[real]


def test_bf16_vision_tower_and_forward_with_images_match_transformers(vlm_dir):
    batch = tiny_vlm_batch()
    ours_v, ref_v, ours, ref = _forward(_stage(vlm_dir, torch.bfloat16), _hf(vlm_dir, torch.bfloat16), batch)
    assert (ours_v - ref_v).abs().max() <= bf16_tol(VISION_DEPTH, ref_v.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= bf16_tol(VISION_DEPTH + TEXT_DEPTH, ref.abs().max().item())
    # the bound is not vacuous: bf16 rounding itself (ours in fp32 vs bf16) moves the logits at least as much
    _, _, ours32, _ = _forward(_stage(vlm_dir, torch.float32), _hf(vlm_dir, torch.float32), batch)
    assert (ours32 - ours).abs().max().item() >= diff


def _greedy(path, dtype, prompts, images):
    from verl_mega.rollout.engine import GenerationEngine
    from verl_mega.rollout.engine_config import EngineConfig

    config = EngineConfig(max_batch=8, max_seq_len=96, max_tokens=1024, block_size=4, kv_len_bucket=16)
    engine = GenerationEngine(_stage(path, dtype), None, config, eos_token_ids=[NEVER], pad_token_id=0)
    out = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images)
    return out.responses()[::2], out.responses()[1::2]


def test_bf16_greedy_generation_with_images(vlm_dir):
    """Tokens exact against transformers' bf16 greedy and our fp32 engine: the seed fixes a case whose top-2
    logit margins along the 8 steps exceed the bf16 bound above (a flip would show a real divergence)."""
    prompts, images = image_prompts(ModelConfig.from_hf(vlm_dir), GRIDS)
    first, second = _greedy(vlm_dir, torch.bfloat16, prompts, images)
    assert first == second  # the 2 samples of a prompt share one bf16 encoding
    assert first == _greedy(vlm_dir, torch.float32, prompts, images)[0]
    assert first == _hf_greedy(vlm_dir, prompts, images)


@torch.no_grad()
def _hf_greedy(path, prompts, images) -> list[list[int]]:
    """transformers' bf16 greedy generate, one prompt at a time, the image / video pad tokens suppressed (as
    tests/rollout/test_vlm_generation.py's fp32 reference)."""
    model, suppress = _hf(path, torch.bfloat16), [IMG, TINY_VLM_DEFAULTS["video_token_id"]]
    out = []
    for ids, img in zip(prompts, images):
        x = torch.tensor([ids])
        kw = {} if img is None else {"pixel_values": img[0].to(torch.bfloat16), "image_grid_thw": img[1],
                                     "mm_token_type_ids": (x == IMG).int()}
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=NEVER, pad_token_id=0, suppress_tokens=suppress,
                             top_k=None, top_p=None, temperature=None, **kw)
        out.append(gen[0, len(ids):].tolist())
    return out


def test_bf16_grpo_step_with_images_trains_the_tower(vlm_dir):
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    prompts, images = image_prompts(ModelConfig.from_hf(vlm_dir), [[(1, 4, 4)], [(1, 4, 6)]], seed=4)
    samples = [{"prompt_ids": p, "pixel_values": pv, "image_grid_thw": grid} for p, (pv, grid) in zip(prompts, images)]
    cfg = TrainerConfig()
    cfg.model.dtype = "bfloat16"
    cfg.trainer.progress_bar, cfg.trainer.save_final = False, False
    actor = get_actor_model(vlm_dir, torch_dtype=torch.bfloat16)
    trainer = PPOTrainer(actor, reward_fn=lambda r: float(int(r.split()[0]) % 2) if r.split() else 0.0,
                         algorithm="grpo", rollout_batch_size=2, n_samples=4, max_new_tokens=4, lr=1e-2,
                         micro_batch_size=4, config=cfg)
    visual = {n: p for n, p in actor.model.named_parameters() if n.startswith("visual.")}
    before = {n: p.detach().clone() for n, p in visual.items()}
    metrics = trainer.step(samples)
    assert math.isfinite(metrics["actor/loss"])
    assert all(p.dtype == torch.bfloat16 for p in visual.values())
    assert any(not torch.equal(p.detach(), before[n]) for n, p in visual.items()), "the vision tower was not updated"


def test_prompt_embeds_between_slices_the_image_rows_of_a_prefill_chunk():
    """The prefill of tokens [start, end) gets the embeddings of the image-pad tokens inside it, in order (a slice
    found on the host, so that a GPU prefill does no boolean indexing); chunks that cut an image split its rows."""
    from verl_mega.rollout.images import PromptImages

    token_index = torch.tensor([3, 4, 5, 9, 10])  # image-pad tokens of the prompt (two images)
    images = PromptImages(torch.arange(5.0)[:, None], token_index, torch.zeros(3, 12, dtype=torch.long), 0)
    for start, end in [(0, 12), (0, 4), (4, 10), (6, 9), (10, 12), (11, 12)]:
        keep = (token_index >= start) & (token_index < end)
        assert torch.equal(images.embeds_between(start, end), images.embeds[keep]), (start, end)


HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")  # device -> host syncs


def test_vlm_decode_step_reads_only_static_buffers_without_host_syncs(vlm_dir, monkeypatch):
    """What CUDA-graph capture of `_decode_forward` needs, checked on CPU (torch's sync debug mode is CUDA-only):
    the model gets the preallocated token buffer and `positions + deltas` (the [B] M-RoPE delta buffer, filled
    with each prompt's delta), no image inputs, and nothing in the step reads a tensor's value on the host
    through the Python methods in HOST_READS (boolean-mask indexing syncs inside C++ and is not caught here:
    code review, see rollout/engine.py `_decode_forward`)."""
    from verl_mega.rollout.engine import GenerationEngine
    from verl_mega.rollout.engine_config import EngineConfig

    prompts, images = image_prompts(ModelConfig.from_hf(vlm_dir), GRIDS)
    config = EngineConfig(max_batch=8, max_seq_len=96, max_tokens=1024, block_size=4, kv_len_bucket=16)
    engine = GenerationEngine(_stage(vlm_dir, torch.bfloat16), None, config, eos_token_ids=[NEVER], pad_token_id=0)
    deltas_buffer, calls = engine._deltas, []
    model_forward, decode_forward = engine.model.forward, engine._decode_forward

    def recording_forward(inputs, position_ids, *args, **kw):
        calls.append((inputs, position_ids, kw))
        return model_forward(inputs, position_ids, *args, **kw)

    def guarded_decode(bb, nb):
        def refuse(self, *a, **k):
            raise AssertionError("a host read of a tensor inside the decode step")

        with monkeypatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, refuse)
            decode_forward(bb, nb)

    monkeypatch.setattr(engine.model, "forward", recording_forward)
    monkeypatch.setattr(engine, "_decode_forward", guarded_decode)
    engine.generate(prompts, max_new_tokens=3, temperature=0.0, images=images)
    decode = [(i, p, kw) for i, p, kw in calls if i.shape[1] == 1]
    # 2 decode steps after the prefill, + the look-ahead window launched before the host reads that the rows ended;
    # the buffer kept
    assert len(decode) == 2 + engine.sync_every and engine._deltas is deltas_buffer
    # each prompt's delta from its M-RoPE positions (text: 0; an image of h x w merged tokens: max(h, w) - h * w)
    want = torch.tensor([0 if img is None else int(mrope_position_ids(
        torch.tensor([ids]), img[1], image_token_id=IMG, vision_start_token_id=VS, spatial_merge_size=2)[1][0])
        for ids, img in zip(prompts, images)])
    assert want[2] == 0 and (want[:2] != 0).all() and torch.equal(deltas_buffer[:3], want)
    for step, (inputs, positions, kw) in enumerate(decode):
        assert inputs.data_ptr() == engine._tokens.data_ptr()  # the static token buffer itself, no copy
        assert not {"pixel_values", "image_grid_thw", "image_embeds"} & set(kw)
        index = torch.tensor([len(ids) + step for ids in prompts])  # the fed token's sequence index
        assert torch.equal(positions[:, 0], index + want)  # 1-axis position + the row's delta


def test_vlm_gpu_check_script_smoke(tmp_path):
    """benchmarks/vlm_gpu_check.py (the integrator's GPU run of these checks, with CUDA graphs) runs on CPU."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.run_python import child_env

    env = child_env()
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "vlm_gpu_check.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "vlm_gpu_check.json").read_text())
    eager = report["generate_gather"]["eager"]
    assert report["ok"] and eager["ok"] and eager["consistent"] and eager["samples_agree"]
    # teacher-forced against transformers (margins in units of the tolerance 2B): the CPU seed has no near tie,
    # so our tokens are HF's argmax (margin 0) and equal its greedy generate; log-probs within the tolerance
    assert eager["worst_margin"] == 0.0 and 0.0 <= eager["worst_logprob_diff"] <= 1.0
    assert eager["first_divergence_from_hf_greedy"] == [None] * len(report["hf_greedy"])
    assert all(len(m) == len(r) for m, r in zip(eager["margins"], eager["responses"]))
