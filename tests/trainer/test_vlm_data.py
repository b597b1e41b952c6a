"""Vision-language data through the trainer's data path (`verl-mega train`: preflight builds the dataset with
the model's image processor, the trainer steps on its items): a multimodal parquet trains for a step; a
malformed image row stops the run before the model loads with the data helper's error, naming the file and
the row (exit status 2, one message). `trainer.step` takes the seed API's user samples (`prompt` + `images`),
encoded with the actor's processor. The memory planner counts the vision tower's parameters."""

import json
import math

import pytest

from verl_mega.apps import demo_vision_task as task
from verl_mega.apps import train_cli

SMALL = ["trainer.rollout_batch_size=2", "rollout.n_samples=2", "rollout.max_new_tokens=2",
         "trainer.progress_bar=false", "trainer.total_steps=1", "trainer.save_final=false", "trainer.tensorboard=false",
         "trainer.reward=verl_mega.apps.demo_vision_task:compute_score", "data.max_prompt_length=64"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """The tiny Qwen2.5-VL with the tiny processor (tokenizer, chat template, image processor) in one directory."""
    from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    path = str(tmp_path_factory.mktemp("tiny_vl_data"))
    make_tiny_qwen2_5_vl(path, seed=3, **save_tiny_vl_processor(path))
    return path


def _config(tmp_path, model: str, data: str) -> str:
    y = tmp_path / "cfg.yaml"
    y.write_text(f"model:\n  path: {model}\ndata:\n  train_path: {data}\n")
    return str(y)


def test_multimodal_parquet_trains_through_verl_mega_train(vlm_dir, tmp_path, capsys):
    rows, _ = task.make_vision_task(seed=1, num_train=4, num_heldout=1, sizes=(56,))
    big, _ = task.make_vision_task(seed=1, num_train=1, num_heldout=1, sizes=(112,))  # 16 image tokens, not 4
    data = task.write_parquet(rows + big, str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    # prompts are 46 tokens with a 56-pixel image, 58 with a 112-pixel one: the last row is dropped, and said so
    assert train_cli.main([_config(tmp_path, vlm_dir, data), *SMALL, "data.max_prompt_length=50",
                           f"trainer.output_dir={out}"]) == 0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["actor/loss"]) and record["prompt_length/tokens"] > 4 * 4  # image pads included
    assert f"dataset 4 prompts from {data} (1 longer than data.max_prompt_length=50 tokens dropped)" \
        in capsys.readouterr().out


def test_malformed_image_row_stops_the_run_naming_file_and_row(vlm_dir, tmp_path, capsys):
    rows, _ = task.make_vision_task(seed=1, num_train=4, num_heldout=1, sizes=(56,))
    rows[2]["images"] = [{"bytes": b"not an image"}]
    data = task.write_parquet(rows, str(tmp_path / "bad.parquet"))
    assert train_cli.main([_config(tmp_path, vlm_dir, data), *SMALL, f"trainer.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "row 2" in err, err
    assert "Traceback" not in err and err.count("error:") == 1
    # images in an "image" column: the message lists the columns, and is not taken for a prompt-column problem
    for row in rows:
        row["image"] = row.pop("images")
    data = task.write_parquet(rows, str(tmp_path / "singular.parquet"))
    assert train_cli.main([_config(tmp_path, vlm_dir, data), *SMALL, f"trainer.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "singular.parquet: row 0: the prompt has 1 <image> markers but the row has no 'images' column" in err
    assert "data.prompt_key" not in err, err
    # tools with images: refused before the model loads (it was refused by the rollout, after loading)
    data = task.write_parquet(task.make_vision_task(seed=1, num_train=4, num_heldout=1, sizes=(56,))[0],
                              str(tmp_path / "ok.parquet"))
    assert train_cli.main([_config(tmp_path, vlm_dir, data), *SMALL, "rollout.tools=[{name: code_interpreter}]",
                           f"trainer.output_dir={tmp_path / 'r'}"]) == 2
    captured = capsys.readouterr()
    assert f"data.train_path={data}: row 0 has images, and multi-turn tool rollouts with images are not supported" \
        in captured.err and "[verl-mega] model" not in captured.out, captured


def test_memory_plan_counts_the_vision_tower(vlm_dir):
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.vision import VisionTower
    from verl_mega.trainer.memory_plan import stage_params, vision_params

    config = ModelConfig.from_hf(vlm_dir)
    tower = VisionTower(config.vision)
    assert vision_params(config.vision) == sum(p.numel() for p in tower.parameters())
    text_only = ModelConfig.from_hf(vlm_dir)
    text_only.vision = None  # the same language model without its tower (not a valid VLM config: only counted)
    assert stage_params(config, 1, 2, 0)[1] - stage_params(text_only, 1, 2, 0)[1] == vision_params(config.vision)
    assert stage_params(config, 1, 2, 1) == stage_params(text_only, 1, 2, 1)  # the tower sits on the first stage


def test_step_on_user_samples_with_images(vlm_dir, tmp_path):
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    rows, _ = task.make_vision_task(seed=4, num_train=2, num_heldout=1, sizes=(56,))
    image_file = tmp_path / "a.png"
    image_file.write_bytes(rows[0]["images"][0]["bytes"])
    samples = [{"prompt": rows[0]["prompt"], "images": [str(image_file)], "ground_truth": "1"},  # a path
               {"prompt": rows[1]["prompt"][0]["content"], "images": rows[1]["images"], "ground_truth": "0"}]  # bytes
    cfg = TrainerConfig()
    cfg.trainer.progress_bar = False
    actor = get_actor_model(vlm_dir, use_vision=True)
    trainer = PPOTrainer(actor, reward_fn=task.compute_score, algorithm="grpo", rollout_batch_size=2, n_samples=2,
                         max_new_tokens=2, config=cfg)
    metrics = trainer.step(samples)
    batch = trainer.last_batch
    assert math.isfinite(metrics["actor/loss"]) and all(g.tolist() == [[1, 4, 4]] for g in batch.image_grid_thw)
    assert samples[0].keys() == {"prompt", "images", "ground_truth"}  # the caller's dicts are not modified
    with pytest.raises(ValueError, match="sample 0"):
        trainer.step([{**samples[0], "images": [str(tmp_path / "missing.png")]}])


def test_use_vision_needs_a_vision_language_model(tmp_path):
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    text_dir = make_tiny_hf_model(str(tmp_path / "text"), hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="use_vision=True"):
        get_actor_model(text_dir, use_vision=True)
