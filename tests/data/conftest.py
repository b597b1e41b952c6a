"""A tiny in-process Hugging Face tokenizer (WordLevel over a few words) with a chat template."""

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

WORDS = ["[PAD]", "[UNK]", "[EOS]", "<user>", "<system>", "<assistant>", "user:", "system:", "assistant:"]
WORDS += "what is one plus two three four five be brief long".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    hf.chat_template = chat_template
    return hf


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def plain_tokenizer():
    return make_tokenizer(None)
