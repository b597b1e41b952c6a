"""LLMJudgerReward: verdicts equal transformers' greedy generate (judge at tp=1 and tp=2), a GRPO step at tp=2
judged by it with unparsable verdicts counted, the verdict parsers and the prompt template.

One 2-rank gloo spawn runs the judge; the reference is transformers' `generate(do_sample=False)` on each judge
prompt alone (no padding), rendered with the judge's chat template. Verdicts are compared exactly as text:
greedy decoding of fp32 logits that agree to ~1e-6 picks the same tokens unless two logits tie that closely.
"""

import math

import pytest
import torch

from verl_mega.model_rewards.judge import (
    DEFAULT_PROMPT_TEMPLATE,
    NO_GROUND_TRUTH,
    PARSERS,
    parse_score,
    parse_yes_no,
    prompt_text,
)
from verl_mega.testing import run_distributed
from verl_mega.testing.tiny_hf import make_tiny_hf_model

MAX_NEW = 12
TEMPLATE = "Q: {prompt}\nA: {response}\nReference: {ground_truth}\nScore:"
SAMPLES = [{"prompt": [{"role": "user", "content": "What is 10*12?"}], "ground_truth": "120"},
           {"prompt": "Count: 1 2 3", "reward_model": {"ground_truth": "4"}},
           {"prompt": [{"role": "user", "content": "Name a colour."}]}]
RESPONSES = ["120", "4 5 6", "Blue."]
GRPO_SAMPLES = [{"prompt": [{"role": "user", "content": "What is 10*12?"}], "ground_truth": "120"},
                {"prompt": [{"role": "user", "content": "Say hi"}]}]


def _suite(judge_dir: str, actor_dir: str) -> dict:
    from verl_mega.rollout import get_actor_model
    from verl_mega.parallel import Layout
    from verl_mega.model_rewards import LLMJudgerReward
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    out = {}
    for tp in (1, 2):
        judge = LLMJudgerReward(judge_dir, prompt_template=TEMPLATE, max_new_tokens=MAX_NEW, tensor_parallel_size=tp)
        res = judge.score_batch(SAMPLES, RESPONSES)
        out[("verdicts", tp)] = [e["verdict"] for e in res.extras]
        out[("result", tp)] = (res.scores, res.failures)
        out["prompts"] = judge.judge_prompts(SAMPLES, RESPONSES)
    actor = get_actor_model(actor_dir, layout=Layout.create(2, 1))
    judge = LLMJudgerReward(judge_dir, prompt_template=TEMPLATE, max_new_tokens=MAX_NEW, tensor_parallel_size=2,
                            offload=True)
    cfg = TrainerConfig()
    cfg.trainer.progress_bar = False
    trainer = PPOTrainer(actor, reward_fn=judge, algorithm="grpo", rollout_batch_size=2, n_samples=2, max_new_tokens=6,
                         lr=1e-3, micro_batch_size=4, config=cfg)
    out["grpo"] = trainer.step(GRPO_SAMPLES)
    batch = trainer.last_batch
    again = judge.score_batch(batch.row_samples, batch.response_texts)  # greedy: the same verdicts as in the step
    out["grpo_check"] = (batch.scores, again.scores, again.failures, [e["verdict"] for e in again.extras])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    judge_dir = make_tiny_hf_model(str(root / "judge"), "qwen2", vocab_size=130, seed=3)
    actor_dir = make_tiny_hf_model(str(root / "actor"), "llama", vocab_size=130, seed=5)
    return judge_dir, run_distributed(_suite, 2, judge_dir, actor_dir, timeout_s=300)


def hf_verdicts(path: str, prompts: list) -> list[str]:
    """transformers' greedy continuation of each chat prompt (rendered with the judge's template), decoded."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for messages in prompts:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
        out.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_verdicts_equal_transformers_greedy_generate(setup, tp):
    judge_dir, results = setup
    prompts = results[0]["prompts"]
    assert prompts[0][0]["content"] == "Q: What is 10*12?\nA: 120\nReference: 120\nScore:"
    assert prompts[1][0]["content"].endswith("Reference: 4\nScore:")  # reward_model.ground_truth
    assert f"Reference: {NO_GROUND_TRUTH}" in prompts[2][0]["content"]
    ref = hf_verdicts(judge_dir, prompts)
    assert len(set(ref)) == len(ref) and all(ref)  # distinct, non-empty verdicts: a meaningful comparison
    for rank, res in enumerate(results):
        assert res[("verdicts", tp)] == ref, (tp, rank)
        scores, failures = res[("result", tp)]
        parsed = [PARSERS["0-10"](v) for v in ref]
        assert failures == sum(p is None for p in parsed)
        assert scores.tolist() == pytest.approx([0.0 if p is None else p for p in parsed])


def test_grpo_step_at_tp2_judged(setup):
    _, results = setup
    m = results[0]["grpo"]
    for key in ("actor/loss", "reward/mean", "actor/grad_norm", "time/reward"):
        assert math.isfinite(m[key]), key
    step_scores, scores, failures, verdicts = results[0]["grpo_check"]
    assert torch.equal(step_scores, scores) and len(verdicts) == 4
    assert m["reward/failures"] == failures == sum(PARSERS["0-10"](v) is None for v in verdicts)
    assert [results[1]["grpo"][k] for k in ("actor/loss", "reward/mean")] == [m["actor/loss"], m["reward/mean"]]


def test_parsers():
    assert parse_score("Score: 7") == 0.7 and parse_score("score=7.5/10") == 0.75
    assert parse_score("I think 8. Score: 3") == 0.3  # the number after "score" wins
    assert parse_score("8 out of 10") == 0.8 and parse_score("Score: 11") is None and parse_score("none") is None
    assert PARSERS["0-1"]("Score: 0.25") == 0.25 and PARSERS["0-1"]("Score: 2") is None
    assert parse_yes_no("Yes, it is correct.") == 1.0 and parse_yes_no("no.") == 0.0
    assert parse_yes_no("Not sure; yes") == 1.0 and parse_yes_no("nope") is None


def test_prompt_template_and_arguments_are_checked():
    from verl_mega.model_rewards import LLMJudgerReward

    assert prompt_text({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}) == \
        "system: S\nuser: U"
    assert all("{" + f + "}" in DEFAULT_PROMPT_TEMPLATE for f in ("prompt", "response", "ground_truth"))
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        LLMJudgerReward("unused", prompt_template="{response} {answer}")
    with pytest.raises(ValueError, match="no {response} field"):
        LLMJudgerReward("unused", prompt_template="{prompt}")
    # a literal JSON example in the template, an unclosed brace: the fix is named (the latter was a bare
    # "expected '}' before end of string" from string.Formatter)
    with pytest.raises(ValueError, match=r"""unknown fields \['"score"'\].* \(literal braces are written \{\{ and \}\}\)"""):
        LLMJudgerReward("unused", prompt_template='{response} Reply as {"score": N}')
    with pytest.raises(ValueError, match=r"prompt_template is not a format string \(expected '\}' before end of string\); "
                                         r"literal braces are written"):
        LLMJudgerReward("unused", prompt_template="{prompt} {response")
    with pytest.raises(ValueError, match="parse 'stars' is not one of"):
        LLMJudgerReward("unused", parse="stars")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        LLMJudgerReward("unused", max_new_tokens=0)
    with pytest.raises(ValueError, match="needs the prompt text"):
        prompt_text({"prompt_ids": [1, 2]})


def test_judge_without_a_tokenizer_fails_when_built(tmp_path):
    """It used to fail at the first reward call (after a rollout) with "pass token-id lists as prompts"."""
    from verl_mega.model_rewards import LLMJudgerReward

    path = make_tiny_hf_model(str(tmp_path / "judge"), "llama", with_tokenizer=False)
    with pytest.raises(ValueError, match=r"judge .*judge has no tokenizer \(tokenizer\.json / tokenizer\.model\)"):
        LLMJudgerReward(path)


def test_prompt_past_the_judges_context_is_a_counted_failure(tmp_path):
    """A judge prompt longer than the judge's max_position_embeddings (256 for the tiny model; the tokenizer is one
    token per character) was generated anyway, reading positions the model never learned, and its verdict scored.
    Now it is not generated: a counted failure naming the lengths; the short one is judged as before."""
    from verl_mega.model_rewards import LLMJudgerReward

    judge = LLMJudgerReward(make_tiny_hf_model(str(tmp_path / "judge"), "llama", seed=2), prompt_template="{response}",
                            parse=lambda verdict: 0.5, max_new_tokens=8)
    res = judge.score_batch([{"prompt": "q"}, {"prompt": "q"}], ["short", "x" * 300])
    assert res.scores.tolist() == [0.5, 0.0] and res.failures == 1
    assert res.extras[1] == {"verdict": None} and isinstance(res.extras[0]["verdict"], str)
    assert "sample 1: judge prompt of " in res.errors[0] and "max_new_tokens=8 exceeds the judge's " \
        "max_position_embeddings=256" in res.errors[0]
