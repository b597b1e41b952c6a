"""One tokenisation of a prompt string everywhere: the dataset (training), `encode_prompts` (generate,
trainer.step with strings) and transformers' AutoTokenizer on a model exported by `save_hf` give the same
ids, with BOS, for the demo's sentencepiece-trained tokenizer; the same for a bare sentencepiece model
and for chat prompts through a chat template."""

import json

import pytest
from transformers import AutoTokenizer

from verl_mega.apps import demo_task as task
from verl_mega.data.dataset import RLDataset
from verl_mega.models.tokenizer import SentencePieceTokenizer, load_tokenizer
from verl_mega.rollout.frontend import encode_prompts

PROMPTS = ["07+12=", "99+00=", "3+4="]


def _dataset_ids(tmp_path, tokenizer, prompts, **kwargs) -> list[list[int]]:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return [item["prompt_ids"] for item in RLDataset(str(path), tokenizer, **kwargs).items]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_tok")
    train, heldout = task.make_arithmetic_task(0, max_operand=20, num_heldout=10)
    sp_file = task.train_char_tokenizer(train + heldout, str(d / "arith.model"))
    model_dir = task.make_model_dir(str(d / "model"), sp_file, hidden_size=32, num_layers=1, num_heads=2,
                                    num_kv_heads=1, intermediate_size=64)
    return sp_file, model_dir


def test_demo_prompt_ids_agree_everywhere_with_bos(demo_model, tmp_path):
    from verl_mega.rollout import get_actor_model

    sp_file, model_dir = demo_model
    tok = load_tokenizer(model_dir)
    want = [[task.BOS_ID] + SentencePieceTokenizer(sp_file).sp.encode(p) for p in PROMPTS]  # what SFT trains on
    assert _dataset_ids(tmp_path, tok, PROMPTS, apply_chat_template=False) == want
    assert encode_prompts(tok, PROMPTS) == want
    assert [AutoTokenizer.from_pretrained(model_dir).encode(p) for p in PROMPTS] == want
    ids, _, _ = task.sft_tensors([{"prompt": p, "reward_model": {"ground_truth": "5"}} for p in PROMPTS], tok)
    assert [row[:len(w)] for row, w in zip(ids.tolist(), want)] == want
    exported = str(tmp_path / "exported")
    get_actor_model(model_dir).save_hf(exported)
    assert [AutoTokenizer.from_pretrained(exported).encode(p) for p in PROMPTS] == want


def test_bare_sentencepiece_model_adds_bos_like_hf(demo_model, tmp_path):
    sp_file, _ = demo_model
    tok = SentencePieceTokenizer(sp_file)
    want = [[tok.bos_token_id] + tok.sp.encode(p) for p in PROMPTS]
    assert _dataset_ids(tmp_path, tok, PROMPTS, apply_chat_template=False) == want
    assert encode_prompts(tok, PROMPTS) == want
    assert tok(PROMPTS[0])["input_ids"] == want[0] and tok.encode(PROMPTS[0], add_special_tokens=False) == want[0][1:]


def test_chat_prompts_agree_between_dataset_and_encode_prompts(tmp_path):
    from verl_mega.testing.tiny_hf import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in chats))
    assert [item["prompt_ids"] for item in RLDataset(str(path), tok).items] == encode_prompts(tok, chats)
