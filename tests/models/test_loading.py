"""Single-process loading: clear errors, tokenizers (HF dir, sentencepiece), save_hf with tokenizer."""

import io
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from verl_mega.models import ModelConfig, load_tokenizer
from verl_mega.rollout.actor import get_actor_model
from verl_mega.testing.tiny_hf import make_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny") / "qwen2"), "qwen2", vocab_size=120)


def test_missing_directory_names_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"model directory {missing} does not exist"):
        get_actor_model(missing)


def test_missing_config_and_weights_name_path(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        get_actor_model(str(tmp_path))
    shutil.copy(os.path.join(tiny_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/model.safetensors"):
        get_actor_model(str(tmp_path))


def test_missing_tensor_names_tensor_and_file(tmp_path, tiny_dir):
    shutil.copy(os.path.join(tiny_dir, "config.json"), tmp_path / "config.json")
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight .* not found in .*model\.safetensors"):
        get_actor_model(str(tmp_path))


def test_single_file_wins_over_a_stale_shard_index_as_in_transformers(tmp_path, tiny_dir):
    """A directory holding both model.safetensors and another model's index + shards (an export written over a
    copy of a sharded checkpoint): transformers reads model.safetensors, and so must we (we read the index)."""
    import json

    from verl_mega.models.hf_io import weight_map

    shutil.copytree(tiny_dir, tmp_path / "m", dirs_exist_ok=True)
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(tmp_path / "m" / "model-00001-of-00001.safetensors"))
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}))
    assert set(weight_map(str(tmp_path / "m")).values()) == {str(tmp_path / "m" / "model.safetensors")}
    os.remove(tmp_path / "m" / "model.safetensors")  # the index alone is still read
    assert set(weight_map(str(tmp_path / "m")).values()) == {str(tmp_path / "m" / "model-00001-of-00001.safetensors")}


def test_layout_that_does_not_fit_the_model(tiny_dir):
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tensor_parallel_size=3"):
        get_actor_model(tiny_dir, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_layers=2 is smaller than pipeline_parallel_size=4"):
        get_actor_model(tiny_dir, pipeline_parallel_size=4)


def test_hf_tokenizer_with_chat_template(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    text = "Compute 12*10 = 120.\nDone!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == ModelConfig.from_hf(tiny_dir).hf_extra["eos_token_id"]
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_no_tokenizer_is_none(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    lines = ["the quick brown fox jumps over the lazy dog", "answer is 120", "hello world"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=40,
                                   model_type="char", bos_id=1, eos_id=2, pad_id=0, unk_id=3)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = load_tokenizer(str(tmp_path))
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (2, 1, 0)
    assert tok.decode(tok.encode("hello fox")) == "hello fox"
    assert tok.encode("hi", add_special_tokens=True)[0] == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    tok.save_pretrained(str(tmp_path / "out"))
    assert load_tokenizer(str(tmp_path / "out")).encode("dog") == tok.encode("dog")


def test_single_process_save_hf_keeps_tokenizer_and_config(tmp_path, tiny_dir):
    actor = get_actor_model(tiny_dir, torch_dtype="float32")
    out = str(tmp_path / "saved")
    actor.save_hf(out)
    assert ModelConfig.from_hf(out).to_dict() == actor.config.to_dict()
    assert load_tokenizer(out).get_vocab() == actor.tokenizer.get_vocab()
    back = get_actor_model(out)
    ids = torch.tensor([[5, 17, 30, 41, 2]])
    assert torch.equal(back.logits(ids), actor.logits(ids))
