"""`verl-mega demo --task tool --quick` end to end (2 processes, SFT -> GRPO with the agent loop and the
local sandbox tool -> held-out evaluation), the demo's SFT loss mask and reward, and RLBatch's loss mask."""

import json

import pytest
import torch

from tests.run_python import run_python
from verl_mega.apps import demo
from verl_mega.apps import demo_tool_task as task
from verl_mega.trainer.batch import RLBatch


def test_rlbatch_loss_mask_separate_from_response_mask():
    b = RLBatch(samples=[{}], prompt_ids=[[5, 6]], n=2)
    b.set_rollout([[1, 2, 3], [4]], [[-1.0] * 3, [-2.0]], pad_id=0, loss_masks=[[1, 0, 1], [1]])
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # which tokens exist (attention)
    assert b.loss_mask.tolist() == [[1, 0, 1], [1, 0, 0]]  # which are trained on
    assert torch.equal(b.train_mask, b.loss_mask)
    (mb,) = b.microbatches(2)
    assert torch.equal(mb["loss_mask"], b.loss_mask)
    b.set_rollout([[1], [2]], [[0.0], [0.0]], pad_id=0)
    assert b.loss_mask is None and torch.equal(b.train_mask, b.response_mask)
    with pytest.raises(ValueError, match="loss_masks"):
        b.set_rollout([[1, 2], [3]], [[0.0] * 2, [0.0]], pad_id=0, loss_masks=[[1], [1]])


def test_sft_tensors_train_only_assistant_tokens():
    from verl_mega.testing.tiny_hf import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    train, _ = task.make_rows(0, 4, 1)
    chat = task.sft_chat(train[0], use_tool=True)
    ids, attn, loss_mask = task.sft_tensors([chat], tok)
    full = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
    assert ids[0].tolist() == full
    # the trained targets (token t + 1 where loss_mask[t] = 1) are exactly the two assistant turns + <|im_end|>
    targets = tok.decode(ids[0, 1:][loss_mask[0, :-1].bool()].tolist(), skip_special_tokens=False)
    truth = train[0]["reward_model"]["ground_truth"]
    assert targets == task.tool_call_text(train[0]) + "<|im_end|>" + truth + "<|im_end|>"
    assert task.compute_score(task.DATA_SOURCE, "x\ntool\n" + truth + "\n\nassistant\n" + truth, truth) == 1.0
    assert task.compute_score(task.DATA_SOURCE, truth + "1", truth) == 0.0
    assert task.compute_score(task.DATA_SOURCE, task.DIRECT + truth, truth) == 1.0


def test_tool_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(["-m", "verl_mega", "demo", "--task", "tool", "--quick", "--output-dir", str(out)], timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rewards"]) == summary["rl_steps"] == 2
    for key in ("accuracy_before", "accuracy_after", "tool_call_rate_before", "tool_call_rate_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert "held-out accuracy" in proc.stdout
    # its data and the command that runs the same RL with `verl-mega train` (examples/configs/tool_grpo.yaml)
    assert len((out / "train.jsonl").read_text().splitlines()) == task.QUICK["train"]
    assert f"verl-mega train examples/configs/tool_grpo.yaml model.path={out / 'model_sft'}" in proc.stdout
    assert (out / "heldout.jsonl").exists()
    # metrics.jsonl like the other demos: `demo --plot` draws the tool run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/accuracy" in r] == [0, 2]
    assert [r["reward/mean"] for r in records if "reward/mean" in r] == pytest.approx(summary["rewards"])
    assert demo.main(["--plot", str(out), "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "reward_curve.png").stat().st_size > 0
