"""A GRPO step with images under data parallelism (tp=1, pp=1, dp=2, gloo) on a tiny random Qwen2.5-VL equals
the single-process step on the same global batch: plain (each rank its own prompts, padded micro-batches) and
with packing + a token budget, where the rows are re-dealt over the dp ranks for equal token counts and take
their prompts' images with them (packing.redeal_images). Same loss, grad norm and updated weights; and the
re-dealt micro-batches carry exactly the images of their rows' prompts (some of them from the other rank).

The rollout is hand-made (a fixed stage in place of sampling, so the two runs train on the same responses);
the reward is the response's word count, so the two samples of a prompt differ and the advantages are not 0.

Tolerances (fp32). Loss and grad norm: 1e-5 relative — both runs compute the same per-token terms; only the
order of the sums differs (micro-batch grouping, padded vs packed attention, the dp all-reduce), a few ulp
(~1e-7) per level of a short sum tree, the bound tests/trainer/test_vlm_grpo.py uses for tp 2 vs tp 1.
Weights: the optimizer runs with Adam eps = 1 and no clipping, so the first step moves each weight by
-lr * g / (|g| + 1) (bias-corrected m = g, v = g^2), a 1-Lipschitz map of g: |w_dp - w_1| <= lr * |g_dp - g_1|
+ the rounding of w - update (2 ulp of |w|), and |g_dp - g_1| <= 1e-5 * ||g|| by the same summation argument.
The dp replicas agree exactly (each applies the same all-reduced gradient).
"""

import pytest
import torch

from verl_mega.testing.multiprocess import run_distributed

N_SAMPLES = 2
R = 5  # response tokens of the hand-made rollout
GRIDS = [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], [], [(1, 4, 4)]]  # 4 prompts: 2, 1, 0, 1 images; dp rank r: 2r, 2r+1
BUDGET = 40  # tokens per micro-batch (rows are 10..30 tokens): 2-3 micro-batches per rank
LR = 0.1
REL = 1e-5  # see the module docstring


def _case(path: str):
    """(prompts, images, responses) of the global batch: one response per row (prompt-major), R, R-1, R-2 tokens."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.testing.vlm_prompts import image_prompts

    config = ModelConfig.from_hf(path)
    prompts, images = image_prompts(config, GRIDS, seed=4)
    texts, _ = image_prompts(config, [[]] * (len(prompts) * N_SAMPLES), seed=5, text_len=R)
    responses = [t[:R - (row % 3)] for row, t in enumerate(texts)]
    return prompts, images, responses


def _reward(response: str) -> float:
    """The word count (responses are space-joined ids): the two samples of every prompt differ."""
    return float(len(response.split()))


def _trainer(path: str, prompts_per_rank: int, responses: list[list[int]], dp_rank: int, budget: int | None):
    """GRPO with a KL loss (the reference pass sees the images too), Adam eps 1, no clipping (module docstring);
    the rollout stage replaced by the hand-made responses of this rank's rows."""
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    cfg = TrainerConfig()
    cfg.algorithm.kl_coef = 0.05
    cfg.trainer.progress_bar, cfg.trainer.save_final = False, False
    cfg.trainer.packing, cfg.trainer.max_tokens_per_micro_batch = budget is not None, budget
    cfg.optim.eps, cfg.optim.clip_grad = 1.0, 0.0
    trainer = PPOTrainer(get_actor_model(path), reward_fn=_reward, algorithm="grpo",
                         rollout_batch_size=prompts_per_rank, n_samples=N_SAMPLES, max_new_tokens=R, lr=LR,
                         micro_batch_size=3, config=cfg)
    rows = prompts_per_rank * N_SAMPLES
    mine = responses[dp_rank * rows:(dp_rank + 1) * rows]

    def rollout(batch, ctx=None):
        batch.set_rollout(mine, [[0.0] * len(r) for r in mine], pad_id=0)
        batch.response_texts = [" ".join(map(str, r)) for r in mine]
        return batch

    trainer.pipeline = trainer.pipeline.replace("rollout", rollout)
    return trainer


def _samples(prompts, images):
    return [{"prompt_ids": p, **({} if img is None else {"pixel_values": img[0], "image_grid_thw": img[1]})}
            for p, img in zip(prompts, images)]


def _run(path: str, prompts, images, responses, per_rank: int, dp_rank: int, budget: int | None) -> dict:
    """One step; its loss, grad norm and updated weights."""
    trainer = _trainer(path, per_rank, responses, dp_rank, budget)
    lo = dp_rank * per_rank
    before = {n: p.detach().clone() for n, p in trainer.actor.model.named_parameters()}
    metrics = trainer.step(_samples(prompts[lo:lo + per_rank], images[lo:lo + per_rank]))
    weights = {n: p.detach().clone() for n, p in trainer.actor.model.named_parameters()}
    return {"loss": metrics["actor/loss"], "grad_norm": metrics["actor/grad_norm"], "weights": weights,
            "max_change": max(float((w - before[n]).abs().max()) for n, w in weights.items()), "trainer": trainer}


def _dp2(path: str) -> dict:
    """Both dp=2 steps on this rank, and the re-dealt micro-batches' image fields."""
    import os

    from verl_mega.trainer.stages import training_microbatches

    prompts, images, responses = _case(path)
    out = {}
    for name, budget in (("plain", None), ("redealt", BUDGET)):
        run = _run(path, prompts, images, responses, 2, int(os.environ["RANK"]), budget)  # dp rank (tp = pp = 1)
        trainer = run.pop("trainer")
        if budget is not None:
            mbs = training_microbatches(trainer.last_batch, trainer.config.trainer, trainer.layout, None)
            run["mbs"] = [{k: mb[k] for k in ("rows", "pixel_values", "image_grid_thw", "image_index", "cu_seqlens")
                           if k in mb} for mb in mbs]
        out[name] = run
        del trainer
    return out


def _redeal():
    """redeal_images alone: rank r owns prompts 0..2 (prompt 1 without images, D = 2 + r so the ranks' widths
    differ) with rows [0, 0, 1, 2]; the rows are dealt by hand: rank 0 keeps its row 0 and takes rank 1's
    rows 2, 3 (prompts 1, 2), rank 1 takes rank 0's rows 1, 2 (prompts 0, 1) and keeps its row 1."""
    from verl_mega.parallel import Layout
    from verl_mega.trainer.packing import redeal_images

    layout = Layout.create(1, 1, 2)
    me = layout.dp_rank
    images = {p: (torch.full((4 * (p + 1), 2 + me), 10.0 * me + p), torch.tensor([[1, 2, 2 * (p + 1)]]))
              for p in (0, 2)}
    deal = [[(0, 0), (1, 2), (1, 3)], [(0, 1), (0, 2), (1, 1)]][me]
    keys, got = redeal_images(images, [0, 0, 1, 2], torch.tensor([s * 2**32 + r for s, r in deal]), layout.dp_group)
    return {"keys": keys, "got": got}


def test_redeal_images_moves_only_the_needed_images():
    ranks = run_distributed(_redeal, 2, timeout_s=120)

    def image(owner, p):
        return torch.full((4 * (p + 1), 2 + owner), 10.0 * owner + p), torch.tensor([[1, 2, 2 * (p + 1)]])

    g = 2**32
    expected = [([0, g + 1, g + 2], {0: image(0, 0), g + 2: image(1, 2)}),  # prompt 1 of rank 1 has no image
                ([0, 1, g + 0], {0: image(0, 0), g + 0: image(1, 0)})]  # rank 0's prompt 0 once for two rows
    for rank, (keys, images) in zip(ranks, expected):
        assert rank["keys"] == keys
        assert rank["got"].keys() == images.keys()
        for k, (pv, grid) in images.items():
            assert torch.equal(rank["got"][k][0], pv) and torch.equal(rank["got"][k][1], grid), k


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    path = str(tmp_path_factory.mktemp("tiny_vl_dp"))
    make_tiny_qwen2_5_vl(path, seed=2)
    return path


def _expected_images(mb: dict, images, me: int):
    """(pixel_values, image_grid_thw, image_index) a micro-batch of global row ids must carry: the images of its
    rows' distinct prompts in order of first appearance; the image-pad tokens of each row point at its prompt's."""
    prompts = [int(g >> 32) * 2 + int(g & (2**32 - 1)) // N_SAMPLES for g in mb["rows"]]
    with_images = [p for p in prompts if images[p] is not None]
    if not with_images:
        return None, None, None, False
    distinct = list(dict.fromkeys(with_images))
    tokens = {p: int(images[p][1].prod(-1).sum()) // 4 for p in distinct}  # spatial_merge_size 2
    start = {p: sum(tokens[q] for q in distinct[:i]) for i, p in enumerate(distinct)}
    index = torch.cat([torch.arange(start[p], start[p] + tokens[p]) for p in with_images])
    moved = any(int(g >> 32) != me and images[p] is not None for g, p in zip(mb["rows"], prompts))
    return (torch.cat([images[p][0] for p in distinct]), torch.cat([images[p][1] for p in distinct]), index, moved)


def test_grpo_step_with_images_dp2_plain_and_redealt_equals_one_process(vlm_dir):
    prompts, images, responses = _case(vlm_dir)
    ref = _run(vlm_dir, prompts, images, responses, len(prompts), 0, None)
    ranks = run_distributed(_dp2, 2, vlm_dir, timeout_s=600)
    assert ref["grad_norm"] > 0
    w_scale = max(float(w.abs().max()) for w in ref["weights"].values())
    atol = LR * REL * ref["grad_norm"] + 2 * torch.finfo(torch.float32).eps * w_scale  # module docstring
    moved = 0
    for name in ("plain", "redealt"):
        for rank in ranks:
            run = rank[name]
            assert abs(run["loss"] - ref["loss"]) <= REL * max(1.0, abs(ref["loss"])), (name, run["loss"], ref["loss"])
            assert abs(run["grad_norm"] - ref["grad_norm"]) <= REL * ref["grad_norm"], (name, run["grad_norm"])
            for n, w in run["weights"].items():
                torch.testing.assert_close(w, ref["weights"][n], rtol=0, atol=atol, msg=f"{name} {n}")
            assert all(torch.equal(w, ranks[0][name]["weights"][n]) for n, w in run["weights"].items())
    assert ref["max_change"] > 100 * atol, "the step barely moved the weights: the comparison would be vacuous"
    for me, rank in enumerate(ranks):
        for mb in rank["redealt"]["mbs"]:
            pv, grid, index, was_moved = _expected_images(mb, images, me)
            if pv is None:
                assert "pixel_values" not in mb and "image_index" not in mb
            else:
                assert torch.equal(mb["pixel_values"], pv) and torch.equal(mb["image_grid_thw"], grid)
                assert torch.equal(mb["image_index"], index)
            assert int(mb["cu_seqlens"][-1]) <= BUDGET
            moved += was_moved
    assert moved > 0, "no row with images was re-dealt to the other rank: the case does not test the transfer"
