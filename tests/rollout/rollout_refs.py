"""Reference helpers shared by the rollout tests: transformers' greedy generate, our engine on a
tiny HF directory, teacher-forced log-probs."""

import torch

TEXT_PROMPTS = ["Hello there, how", "a", "The quick brown fox jumps", "42 + 7 ="]
CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color"}]
NEVER = 10_000  # an "EOS" id outside the vocabulary: rows never stop early
PAD = 0  # the tiny tokenizer's <pad>


def tokenize(path, prompts) -> list[list[int]]:
    """Token ids as a user would get them: tokenizer(text), or the chat template for message lists
    (with the repo's tokenizer loader, as `verl-mega generate` uses)."""
    from verl_mega.models.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tok(p)["input_ids"])
        else:
            text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def hf_greedy(path, prompt_ids, eos_token_id, max_new_tokens) -> list[list[int]]:
    """transformers' greedy generate over the batch, left-padded; each row's response up to and
    including EOS (HF pads finished rows with pad_token_id)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p_len = max(len(p) for p in prompt_ids)
    batch = {"input_ids": torch.tensor([[PAD] * (p_len - len(p)) + p for p in prompt_ids]),
             "attention_mask": torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompt_ids])}
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=PAD, top_k=None, top_p=None, temperature=None)
    stops = set(eos_token_id) if isinstance(eos_token_id, list) else {eos_token_id}
    responses = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        resp = []
        for t in row:
            resp.append(t)
            if t in stops:
                break
        responses.append(resp)
    return responses


def build_engine(path, tp, eos_token_id, max_batch=8, device="cpu", **kw):
    """Our one-stage model loaded from the HF directory, TP over a fresh layout, on `device`, and its engine
    (continuous batching, paged cache of 4-token blocks; `kw` overrides EngineConfig fields)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import load_hf_weights
    from verl_mega.models.parallelize import build_stage
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.engine import GenerationEngine
    from verl_mega.rollout.engine_config import EngineConfig

    layout = Layout.create(tp=tp, pp=1)
    model = build_stage(ModelConfig.from_hf(path), layout, init_seed=None)
    load_hf_weights(model, path)
    model.to(device).eval()
    config = EngineConfig(**{"max_batch": max_batch, "max_seq_len": 64, "max_tokens": 1024, "block_size": 4,
                             "kv_len_bucket": 16, **kw})
    engine = GenerationEngine(model, layout.tp_group, config, eos_token_ids=[eos_token_id], pad_token_id=0)
    return engine, model


def teacher_forced_logprobs(model, out, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of a full forward over [prompt | response] at the response tokens [N, R]."""
    from verl_mega.rollout.sampling import gather_vocab_logits

    p_len = out.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(out.input_ids, out.position_ids, out.attention_mask)  # [N, P+R, V_local]
    n, s, v = logits.shape
    full = gather_vocab_logits(logits.reshape(n * s, v), model.tp_group, model.true_vocab_size).view(n, s, -1)
    logp = torch.log_softmax(full[:, p_len - 1:-1] / temperature, dim=-1)  # position t predicts token t+1
    return logp.gather(-1, out.response_ids[..., None]).squeeze(-1) * out.response_mask
