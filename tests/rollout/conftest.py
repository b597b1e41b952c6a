import pytest


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen2 HF directory (q/k/v biases, GQA) with the character tokenizer."""
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_qwen2")), arch="qwen2", vocab_size=130, seed=3)
