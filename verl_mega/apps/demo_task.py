"""The demo's task, made locally: two-digit addition ("07+12=" -> "19"), a sentencepiece tokenizer
trained on it, and a tiny Llama-style model written as a Hugging Face directory.

- Task: all pairs a, b in [0, max_operand), operands zero-padded to two digits (so digits line up,
  which a 2-layer model learns in a few hundred steps); a random held-out set of pairs is never
  trained on. Rows use verl's dataset format (`prompt`, `data_source`, `reward_model.ground_truth`).
- Tokenizer: `sentencepiece.SentencePieceTrainer.train` from an in-memory iterator, character model
  (digits, '+', '='; ids 0-3 are <pad>, <unk>, <s>, </s>), written into the model directory as a
  transformers fast tokenizer (`save_hf_tokenizer`: same ids, <s> prepended to plain text), so training,
  `generate`, the exported model and `AutoTokenizer` all tokenise a prompt the same way.
- Model: transformers' `LlamaForCausalLM` at a tiny size with its default (std 0.02) initialisation,
  `save_pretrained` into a directory next to the tokenizer, so the run loads it like any HF model.
- Reward: exact match of the decoded response with the answer.
"""

from __future__ import annotations

import io
import json
import os
import random

import torch

DATA_SOURCE = "arithmetic"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def make_arithmetic_task(seed: int = 0, max_operand: int = 100, num_heldout: int = 200) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) over all pairs a, b < max_operand; held-out pairs are disjoint from train."""
    if max_operand < 2 or max_operand > 100:
        raise ValueError(f"max_operand must be in [2, 100] (two-digit operands), got {max_operand}")
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    if not 0 < num_heldout < len(pairs):
        raise ValueError(f"num_heldout must be in (0, {len(pairs)}), got {num_heldout}")
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a:02d}+{b:02d}=", "data_source": DATA_SOURCE,
             "reward_model": {"ground_truth": str(a + b), "style": "rule"}, "extra_info": {"a": a, "b": b}}
            for a, b in pairs]
    return rows[num_heldout:], rows[:num_heldout]


def write_jsonl(rows: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def answer(row: dict) -> str:
    return row["reward_model"]["ground_truth"]


def exact_match(solution_str: str, ground_truth: str) -> float:
    """1.0 if the response (stripped) is exactly the answer, else 0.0 (verl compute_score style)."""
    return float(solution_str.strip() == str(ground_truth))


def train_char_tokenizer(rows: list[dict], out_file: str) -> str:
    """Train a character-level sentencepiece model on the task's text; writes `out_file` (.model)."""
    import sentencepiece as spm

    texts = [r["prompt"] + answer(r) for r in rows]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, model_type="char", vocab_size=len(set("".join(texts))) + 4,
        add_dummy_prefix=False, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False,
        minloglevel=2)
    with open(out_file, "wb") as f:
        f.write(proto.getvalue())
    return out_file


def make_model_dir(out_dir: str, tokenizer_file: str, *, hidden_size: int = 128, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 384, seed: int = 0) -> str:
    """A randomly initialised tiny Llama (transformers' default init) + the sentencepiece tokenizer in `out_dir`."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    vocab = spm.SentencePieceProcessor(model_file=tokenizer_file).get_piece_size()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    save_hf_tokenizer(tokenizer_file, out_dir)
    return out_dir


def save_hf_tokenizer(tokenizer_file: str, out_dir: str) -> None:
    """Write the character sentencepiece model as a transformers fast tokenizer in `out_dir`
    (tokenizer.json + tokenizer_config.json) that prepends <s> to plain text as training does:
    `AutoTokenizer.from_pretrained(out_dir).encode(text)` equals
    `SentencePieceTokenizer(tokenizer_file).encode(text)` ([<s>] + one id per character).

    The vocabulary is the sentencepiece one (same ids and scores) as a unigram model; with single
    characters as the only pieces its segmentation is one piece per character, as sentencepiece's char
    model. Spaces map to "▁" both ways, as sentencepiece does."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=tokenizer_file)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Replace("\u2581", " ")
    bos = sp.id_to_piece(BOS_ID)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=sp.id_to_piece(EOS_ID),
                                   unk_token=sp.id_to_piece(UNK_ID), pad_token=sp.id_to_piece(PAD_ID))
    fast.padding_side = "left"
    fast.save_pretrained(out_dir)


def sft_tensors(rows: list[dict], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Supervised sequences "<s>prompt answer</s>" right-padded: (input_ids [B, S], attention_mask [B, S],
    loss_mask [B, S]); loss_mask is 1 at positions whose NEXT token is an answer token or </s>."""
    seqs, targets = [], []
    for r in rows:
        prompt = tokenizer.encode(r["prompt"], add_special_tokens=True)
        tail = tokenizer.encode(answer(r), add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(prompt + tail)
        targets.append([0] * len(prompt) + [1] * len(tail))
    return right_pad_supervised(seqs, targets, PAD_ID)


def right_pad_supervised(seqs: list[list[int]], targets: list[list[int]], pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, S], attention_mask [B, S], loss_mask [B, S]) from token sequences and a
    per-token 0/1 "train on this token" list each; loss_mask[b, t] = targets[b][t + 1] (position t predicts t + 1)."""
    s = max(map(len, seqs))
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), s)
    for i, (seq, target) in enumerate(zip(seqs, targets)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        loss_mask[i, :len(seq) - 1] = torch.tensor(target[1:], dtype=torch.float32)
    return ids, mask, loss_mask
