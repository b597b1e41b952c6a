"""The RL update with images on a tiny random Qwen2.5-VL: the LogProbs stage (micro-batches carrying
pixel_values / image_grid_thw / 3-axis positions, padded and packed) equals transformers' teacher-forced
log-probs at tp 1 and the same at tp 2 and pp 2; a GRPO step at pp 2 trains the tower on the first stage;
a GRPO step (KL loss, so the reference pass sees the images too) at tp 2 runs with a finite loss, changes
the language and the vision weights, and keeps the replicated vision tower identical on both TP ranks; its checkpoint (DCP, saved at tp 2) exported with `verl-mega
export` loads in transformers with every tensor equal to the trained ones, visual.* included (exact:
fp32 copies).

Tolerances: log-probs vs transformers 1e-4 (fp32; the two implementations differ by summation order
only, ~1e-6 on logits of this size; the issue's logit tolerance); tp 2 vs tp 1 1e-5 (the same code, only
the TP reductions' order differs); the replicated tower after the step: exact (every TP rank applies the
same all-reduced gradient).
"""

import math

import pytest
import torch

from verl_mega.testing.multiprocess import run_distributed

N_SAMPLES = 2
R = 5  # response tokens of the hand-made rollout


def _case(path: str):
    """Prompts with 2, 1 and 0 images (token ids, images) and hand-made responses (one row per sample)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.testing.vlm_prompts import image_prompts

    prompts, images = image_prompts(ModelConfig.from_hf(path), [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], []], seed=4)
    # responses: text ids (image_prompts' text without its images), R, R - 1, R - 2 tokens long
    texts, _ = image_prompts(ModelConfig.from_hf(path), [[]] * (len(prompts) * N_SAMPLES), seed=5, text_len=R)
    responses = [t[:R - (row % 3)] for row, t in enumerate(texts)]
    return prompts, images, responses


def _samples(prompts, images):
    return [{"prompt_ids": p, **({} if img is None else {"pixel_values": img[0], "image_grid_thw": img[1]})}
            for p, img in zip(prompts, images)]


def _reward(response: str) -> float:
    """Parity of the first generated id (the model has no tokenizer: responses are space-joined ids), so that the
    samples of a prompt score differently and GRPO's advantages are not all zero."""
    words = response.split()
    return float(int(words[0]) % 2) if words else 0.0


def _trainer(path: str, tp: int, pp: int = 1):
    """GRPO with a KL loss; micro-batches of 3 rows: [p0, p0, p1] and [p1, p2, p2] mix prompts with 2, 1 and 0
    images and split a prompt's samples over two micro-batches (each encodes that prompt's images once)."""
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    cfg = TrainerConfig()
    cfg.algorithm.kl_coef = 0.05  # a reference model: its log-prob pass takes the images too
    cfg.trainer.progress_bar, cfg.trainer.save_final = False, False
    cfg.trainer.old_logprobs = "recompute"  # _logprobs reads the LogProbs stage's old log-probs
    actor = get_actor_model(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    return PPOTrainer(actor, reward_fn=_reward, algorithm="grpo",
                      rollout_batch_size=3, n_samples=N_SAMPLES, max_new_tokens=4, lr=1e-2, micro_batch_size=3,
                      config=cfg)


def _logprobs(trainer, prompts, images, responses) -> dict[str, torch.Tensor]:
    """Old log-probs of the hand-made rollout through the trainer's LogProbs stage, padded and packed."""
    from verl_mega.trainer.stages import stage_name

    stage = next(s for s in trainer.pipeline.stages if stage_name(s) == "logprob")
    out = {}
    for packed in (False, True):
        trainer.config.trainer.packing = packed
        batch = trainer.make_batch(_samples(prompts, images))
        batch.set_rollout(responses, [[0.0] * len(r) for r in responses], pad_id=0)
        out["packed" if packed else "padded"] = stage(batch).old_logprobs
    trainer.config.trainer.packing = False
    return out


def _tp2(path: str, root: str) -> dict:
    import torch.distributed as dist

    from verl_mega.trainer.checkpoint import save_checkpoint

    prompts, images, responses = _case(path)
    pipelined = _trainer(path, 1, pp=2)  # the tower on the first stage only
    pp2 = _logprobs(pipelined, prompts, images, responses)
    before = {n: p.detach().clone() for n, p in pipelined.actor.model.named_parameters() if n.startswith("visual.")}
    pp2["loss"] = pipelined.step(_samples(prompts, images))["actor/loss"]  # 1F1B: the tower's gradient via stage 0
    pp2["visual_changed"] = any(not torch.equal(p.detach(), before[n])
                                for n, p in pipelined.actor.model.named_parameters() if n.startswith("visual."))
    pp2["first_stage"] = pipelined.layout.is_first_stage
    trainer = _trainer(path, 2)
    out = {**_logprobs(trainer, prompts, images, responses), "pp2": pp2}
    model = trainer.actor.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.step(_samples(prompts, images))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    visual = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.startswith("visual.")])
    others = [torch.empty_like(visual) for _ in range(2)]
    dist.all_gather(others, visual, group=trainer.layout.tp_group)
    save_checkpoint(trainer.actor_engine, root, 1, tokenizer_path=path)
    shards = {model.hf_name(n): (model.shard_slice(p), p.detach().clone(), model.is_vocab_param(n))
              for n, p in model.named_parameters()}
    return {**out, "metrics": metrics, "changed": changed, "visual_equal": torch.equal(others[0], others[1]),
            "shards": shards}


def _hf_logprobs(path, prompts, images, responses) -> torch.Tensor:
    """transformers' log_softmax at each response token, one unpadded row at a time -> [N, R] (0 at padding)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    out = torch.zeros(len(responses), R)
    for row, resp in enumerate(responses):
        p = row // N_SAMPLES
        ids = torch.tensor([prompts[p] + resp])
        # mm_token_type_ids (as the processor returns it) makes transformers compute the M-RoPE positions
        kw = {} if images[p] is None else {"pixel_values": images[p][0], "image_grid_thw": images[p][1],
                                           "mm_token_type_ids": (ids == model.config.image_token_id).int()}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].float()
        logp = torch.log_softmax(logits[len(prompts[p]) - 1:-1], dim=-1)  # position t predicts token t + 1
        out[row, :len(resp)] = logp.gather(1, torch.tensor(resp)[:, None])[:, 0]
    return out


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    path = str(tmp_path_factory.mktemp("tiny_vl_rl"))
    make_tiny_qwen2_5_vl(path, seed=2)
    return path


@pytest.fixture(scope="module")
def tp2(vlm_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlm_ckpt"))
    return {"ranks": run_distributed(_tp2, 2, vlm_dir, root, timeout_s=600), "root": root}


def test_logprobs_with_images_match_transformers_tp1(vlm_dir):
    prompts, images, responses = _case(vlm_dir)
    ours = _logprobs(_trainer(vlm_dir, 1), prompts, images, responses)
    ref = _hf_logprobs(vlm_dir, prompts, images, responses)
    mask = ref != 0  # the response tokens (log-probs at padding are never used)
    assert int(mask.sum()) == sum(map(len, responses))
    torch.testing.assert_close(ours["padded"][mask], ref[mask], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["packed"][mask], ref[mask], rtol=0, atol=1e-4)


def test_logprobs_tp2_equal_tp1_and_grpo_step_with_images(vlm_dir, tp2):
    prompts, images, responses = _case(vlm_dir)
    ref = _logprobs(_trainer(vlm_dir, 1), prompts, images, responses)
    mask = torch.zeros_like(ref["padded"], dtype=torch.bool)
    for row, resp in enumerate(responses):
        mask[row, :len(resp)] = True  # the response tokens (log-probs at padding are never used)
    for rank in tp2["ranks"]:
        torch.testing.assert_close(rank["padded"][mask], ref["padded"][mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(rank["packed"][mask], ref["padded"][mask], rtol=0, atol=1e-5)
        for kind in ("padded", "packed"):  # pp 2: the first stage encodes, the second gets hidden states only
            torch.testing.assert_close(rank["pp2"][kind][mask], ref["padded"][mask], rtol=0, atol=1e-5)
        assert math.isfinite(rank["pp2"]["loss"])
        assert rank["pp2"]["visual_changed"] == rank["pp2"]["first_stage"]  # a GRPO step at pp 2 trains the tower
        m = rank["metrics"]
        assert math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/grad_norm"]) and m["actor/grad_norm"] > 0
        assert any(n.startswith("visual.") for n in rank["changed"]), "the vision tower was not updated"
        assert any(n.startswith("layers.") for n in rank["changed"])
        assert rank["visual_equal"], "the replicated vision tower diverged between TP ranks"
    same = [{k: v for k, v in r["metrics"].items() if not k.startswith(("time/", "throughput/"))} for r in tp2["ranks"]]
    assert same[0] == same[1]  # every metric but the wall clock agrees on both ranks


def test_checkpoint_exports_to_transformers_with_the_vision_tower(tp2, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    from verl_mega.apps import export_cli

    out = str(tmp_path / "hf")
    assert export_cli.main([tp2["root"], out]) == 0
    # the closing line names the Auto class that loads it (AutoModelForCausalLM refuses a Qwen2.5-VL config)
    assert f"load it with transformers' AutoModelForImageTextToText.from_pretrained({out!r})" in capsys.readouterr().out
    assert isinstance(AutoModelForImageTextToText.from_pretrained(out), Qwen2_5_VLForConditionalGeneration)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # transformers 5 names in memory -> the checkpoint names our hf_name() uses
    theirs = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
              for k, v in model.state_dict().items()}
    seen_visual = 0
    for rank in tp2["ranks"]:
        for hf, (index, shard, vocab) in rank["shards"].items():
            full = theirs[hf]
            if vocab:  # our shards hold the padded vocabulary (zero rows past vocab_size)
                full = torch.nn.functional.pad(full, (0, 0, 0, shard.shape[0] * 2 - full.shape[0]))
            assert torch.equal(full[index], shard), hf
            seen_visual += hf.startswith("visual.")
    assert seen_visual > 0
