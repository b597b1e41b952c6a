"""The one tokenisation of prompt text, shared by the dataset (training), `encode_prompts` (generate,
`trainer.step` with strings) and the demo, so that a prompt gets the same ids everywhere."""


def encode_text(tokenizer, text: str, *, templated: bool = False) -> list[int]:
    """Token ids of prompt `text`: with the tokenizer's special tokens (e.g. BOS) for plain text; without
    them when `templated` (a chat template's rendering carries its own)."""
    return list(tokenizer.encode(text, add_special_tokens=not templated))
