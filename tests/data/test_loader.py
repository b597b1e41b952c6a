"""PromptLoader: deterministic shuffling, resume mid-epoch, DP sharding, left padding."""

import json

import pytest
import torch

from verl_mega.data import PromptLoader, get_dataloader, left_pad
from verl_mega.data.loader import PADDING_KEY


def items(n):
    return [{"index": i} for i in range(n)]


def idx(batches):
    return [[it["index"] for it in b] for b in batches]


def test_deterministic_epochs_and_shapes():
    a = PromptLoader(items(10), 3, seed=1)
    b = PromptLoader(items(10), 3, seed=1)
    e0, e1 = idx(a), idx(a)
    assert len(a) == 3 and len(e0) == 3 and all(len(x) == 3 for x in e0)
    assert e0 == idx(b) and e0 != e1  # same seed same order; epochs differ
    assert sorted(sum(e0, [])) != list(range(9))  # shuffled
    assert len(set(sum(e0, []))) == 9  # no repeats within an epoch
    assert idx(PromptLoader(items(5), 2, shuffle=False, drop_last=False)) == [[0, 1], [2, 3], [4]]


def test_resume_mid_epoch():
    ref = PromptLoader(items(12), 2, seed=3)
    full = idx(ref) + idx(ref)  # two epochs, 12 batches
    run = PromptLoader(items(12), 2, seed=3)
    it = iter(run)
    seen = [[x["index"] for x in next(it)] for _ in range(4)]
    state = run.state_dict()
    assert state == {"epoch": 0, "index": 4, "seed": 3, "dataset_len": 12, "batch_size": 2, "dp_size": 1}
    resumed = PromptLoader(items(12), 2, seed=3)
    resumed.load_state_dict(state)
    rest = idx(resumed)  # the rest of epoch 0
    assert seen + rest == full[:6]
    assert idx(resumed) == full[6:] and resumed.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="13 prompts"):
        PromptLoader(items(13), 2, seed=3).load_state_dict(state)


def test_resume_after_an_epochs_last_batch_starts_the_next_epoch():
    ref = PromptLoader(items(4), 2, seed=3)
    full = idx(ref) + idx(ref)  # two epochs of 2 batches
    run = PromptLoader(items(4), 2, seed=3)
    for k, batch in enumerate(run):  # a trainer that stops (checkpoints) after the epoch's last batch
        if k == 1:
            break
    state = run.state_dict()
    assert state["epoch"] == 0 and state["index"] == 2
    resumed = PromptLoader(items(4), 2, seed=3)
    resumed.load_state_dict(state)
    assert idx(resumed) == full[2:]  # epoch 1 (was nothing: the rest of the finished epoch 0)
    assert idx(run) == full[2:]  # the same loader iterated again after the break


def test_resume_with_another_batch_size_continues_at_the_same_prompt(caplog):
    order = sum(idx(PromptLoader(items(12), 12, seed=3)), [])  # the epoch's order, independent of the batch size
    run = PromptLoader(items(12), 4, seed=3)
    next(iter(run))  # 4 prompts done
    state = run.state_dict()
    assert (state["batch_size"], state["dp_size"]) == (4, 1)
    smaller = PromptLoader(items(12), 2, seed=3)
    smaller.load_state_dict(state)
    assert sum(idx(smaller), []) == order[4:]  # 4 = 2 batches of 2: exact (was order[2:], 2 prompts again)
    split = [PromptLoader(items(12), 1, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for loader in split:
        loader.load_state_dict(state)
    assert sorted(sum(sum((idx(l) for l in split), []), [])) == sorted(order[4:])
    larger = PromptLoader(items(12), 3, seed=3)
    with caplog.at_level("WARNING"):
        larger.load_state_dict(state)  # 4 is not a multiple of 3: the next boundary, 6, skipping 2
    assert sum(idx(larger), []) == order[6:] and "2 prompts of this epoch skipped" in caplog.text


def test_dp_sharding_partitions_global_batch():
    shards = [idx(PromptLoader(items(13), 2, seed=0, dp_rank=r, dp_size=3)) for r in range(3)]
    assert all(len(s) == 2 for s in shards)  # 13 // (2*3) steps on every rank
    for k in range(2):
        union = sum((s[k] for s in shards), [])
        assert len(set(union)) == 6
    single = idx(PromptLoader(items(13), 6, seed=0))
    assert [sum((s[k] for s in shards), []) for k in range(2)] == single
    # drop_last=False: the short last global batch (1 prompt) is padded so each rank gets one item
    tail = [idx(PromptLoader(items(13), 2, seed=0, drop_last=False, dp_rank=r, dp_size=3))[-1] for r in range(3)]
    assert [len(t) for t in tail] == [1, 1, 1]
    last = [list(PromptLoader(items(13), 2, seed=0, drop_last=False, dp_rank=r, dp_size=3))[-1][0] for r in range(3)]
    assert [PADDING_KEY in it for it in last] == [False, True, True]  # the repeats are marked, the prompt is not
    assert all(PADDING_KEY not in it for b in PromptLoader(items(12), 2, drop_last=False, dp_size=3) for it in b)


def test_bad_loader_args():
    with pytest.raises(ValueError, match="dp_rank"):
        PromptLoader(items(4), 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="no full batch"):
        PromptLoader(items(3), 4)
    with pytest.raises(ValueError, match="empty"):
        PromptLoader([], 1)


def test_get_dataloader_from_file(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": w}) for w in ["one", "two", "three", "one two"]))
    loader = get_dataloader(path, tokenizer, 2, seed=0, max_prompt_length=3)
    assert loader.dataset.filtered == 1 and len(loader) == 1
    (batch,) = list(loader)
    ids, mask = left_pad([it["prompt_ids"] for it in batch], tokenizer.pad_token_id)
    assert ids.shape == (2, 3) and mask.all()
    # loader keywords reach PromptLoader (its defaults otherwise), the rest RLDataset
    assert (loader.shuffle, loader.drop_last, loader.dp_size) == (True, True, 1)
    split = get_dataloader(path, tokenizer, 1, shuffle=False, dp_rank=1, dp_size=2, prompt_key="prompt")
    assert (split.shuffle, split.dp_rank, split.dp_size, len(split.dataset)) == (False, 1, 2, 4)
    with pytest.raises(ValueError, match=r"dataset options \['max_prompt_length'\]"):
        get_dataloader(loader.dataset, tokenizer, 2, seed=1, max_prompt_length=3)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [0, 0, 8], [0, 9, 10]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError):
        left_pad([], 0)
