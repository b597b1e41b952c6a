"""RewardModel: parity with transformers' *ForSequenceClassification at (tp, pp) = (1,1), (2,1), (1,2); a GRPO
step at tp=2 scored by it (offloaded between calls); the fallback combination; batching helpers and errors.

One 2-rank gloo spawn computes everything distributed; the tests assert on its results. Parity tolerance:
1e-4 absolute on O(1) scores in fp32 (the sharded matmuls and all-reduces only reorder fp32 sums, which moves
a score by ~1e-6; the same bound as tests/models/test_hf_parity.py). The reward model's tokenizer has its own
chat template (not the actor's ChatML), so the reference re-renders every (prompt, response) with it.
"""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from verl_mega.testing import run_distributed
from verl_mega.testing.tiny_hf import make_tiny_hf_model, make_tiny_tokenizer, randomize_weights, tiny_hf_config

TOL = 1e-4
RM_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # not the actor's ChatML
SAMPLES = [{"prompt": [{"role": "user", "content": "What is 10*12?"}]},
           {"prompt": "Count: 1 2 3"},
           {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
           {"prompt": [{"role": "user", "content": "2+2?"}]}]
RESPONSES = ["120", "4 5 6, and then 7", "Blue.", "The answer is 4, because two and two make four."]
GRPO_SAMPLES = [{"prompt": [{"role": "user", "content": "What is 10*12?"}]},
                {"prompt": [{"role": "user", "content": "Say hi"}]}]


def make_tiny_reward_model(out_dir: str, arch: str, seed: int) -> str:
    """A random `{Llama,Qwen2}ForSequenceClassification` (one label) + the character tokenizer with RM_TEMPLATE."""
    from transformers import AutoModelForSequenceClassification

    tok = make_tiny_tokenizer()
    tok.chat_template = RM_TEMPLATE
    tok.save_pretrained(out_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tiny_hf_config(arch, vocab_size=130, token_ids=ids)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


def hf_scores(path: str, samples: list[dict], responses: list[str]) -> torch.Tensor:
    """transformers' scores [B]: the RM chat template over prompt + assistant response, left-padded batch."""
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path, padding_side="left")
    texts = []
    for s, r in zip(samples, responses):
        messages = [{"role": "user", "content": s["prompt"]}] if isinstance(s["prompt"], str) else s["prompt"]
        texts.append(tok.apply_chat_template([*messages, {"role": "assistant", "content": r}], tokenize=False))
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).logits.squeeze(-1)


def _suite(dirs: dict, actor_dir: str) -> dict:
    from verl_mega.rollout import get_actor_model
    from verl_mega.parallel import Layout
    from verl_mega.model_rewards import RewardModel
    from verl_mega.rewards import FallbackReward, RuleBasedReward
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    layouts = {"tp1pp1": Layout.create(1, 1), "tp2pp1": Layout.create(2, 1), "tp1pp2": Layout.create(1, 2)}
    out = {}
    for name, path in dirs.items():
        for lname, layout in layouts.items():  # 160 padded tokens per forward: 2 micro-batches of 2 rows
            out[("scores", name, lname)] = RewardModel(path, layout=layout, max_tokens_per_batch=160).score_batch(
                SAMPLES, RESPONSES).scores
    actor = get_actor_model(actor_dir, layout=layouts["tp2pp1"])
    rm = RewardModel(dirs["llama"], layout=actor.layout, offload=True)
    cfg = TrainerConfig()
    cfg.trainer.progress_bar = False
    trainer = PPOTrainer(actor, reward_fn=rm, algorithm="grpo", rollout_batch_size=2, n_samples=2, max_new_tokens=6,
                         lr=1e-3, micro_batch_size=4, config=cfg)
    out["grpo"] = trainer.step(GRPO_SAMPLES)
    out["grpo_rows"] = (trainer.last_batch.row_samples, trainer.last_batch.response_texts, trainer.last_batch.scores)
    out["offloaded_device"] = {p.device.type for p in rm.actor.model.parameters()}
    mixed = [{**SAMPLES[0], "data_source": "gsm8k", "ground_truth": "120"}, SAMPLES[1],
             {**SAMPLES[3], "data_source": "gsm8k", "ground_truth": "5"}]
    res = FallbackReward(RuleBasedReward(), rm).score_batch(mixed, ["#### 120", RESPONSES[1], "#### 4"])
    out["fallback"] = (res.scores, res.failures, [e.get("fallback", False) for e in res.extras])
    try:  # ranks of one tp group passing different rows: a clear error on both, not a hang
        rm.score_batch(SAMPLES[: 1 + dist.get_rank()], RESPONSES[: 1 + dist.get_rank()])
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    dirs = {arch: make_tiny_reward_model(str(root / arch), arch, seed=i) for i, arch in enumerate(("llama", "qwen2"))}
    actor_dir = make_tiny_hf_model(str(root / "actor"), "llama", vocab_size=130, seed=5)
    return dirs, run_distributed(_suite, 2, dirs, actor_dir, timeout_s=300)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2"])
def test_scores_match_transformers(setup, arch, layout):
    dirs, results = setup
    ref = hf_scores(dirs[arch], SAMPLES, RESPONSES)  # rows of 44 to 78 tokens: left-padded
    assert ref.abs().max() > 0.1 and ref.std() > 0.01  # not a degenerate reference
    for rank, res in enumerate(results):
        err = (res[("scores", arch, layout)] - ref).abs().max().item()
        assert err < TOL, f"{arch} {layout} rank {rank}: max abs error {err}"


def test_grpo_step_at_tp2_scored_by_the_reward_model(setup):
    dirs, results = setup
    m = results[0]["grpo"]
    for key in ("actor/loss", "reward/mean", "reward/std", "actor/grad_norm", "time/reward"):
        assert math.isfinite(m[key]), key
    assert m["reward/failures"] == 0 and m["reward/std"] > 0
    assert [results[1]["grpo"][k] for k in ("actor/loss", "reward/mean")] == [m["actor/loss"], m["reward/mean"]]
    samples, texts, scores = results[0]["grpo_rows"]
    ref = hf_scores(dirs["llama"], samples, texts)  # the trainer's rows, re-tokenised with the RM's template
    assert (scores - ref).abs().max().item() < TOL
    assert all(r["offloaded_device"] == {"cpu"} for r in results)  # weights back in CPU memory after the call


def test_fallback_uses_the_model_where_the_rule_fails(setup):
    dirs, results = setup
    scores, failures, used_model = results[0]["fallback"]
    assert used_model == [False, True, False] and failures == 0  # sample 1 has no data_source: the rule raises
    assert scores[0].item() == 1.0 and scores[2].item() == 0.0  # the rule's verdicts
    ref = hf_scores(dirs["llama"], SAMPLES, RESPONSES)[1]
    assert abs(scores[1].item() - ref.item()) < TOL
    assert torch.equal(results[1]["fallback"][0], scores)


def test_different_rows_across_a_tp_group_is_a_clear_error(setup):
    _, results = setup
    assert all("passed different rows" in (r["mismatch"] or "") for r in results)


def test_token_budget_batches_and_left_pad():
    from verl_mega.model_rewards.reward_model import left_pad, token_budget_batches

    # longest first: [10, 4] pads to 2 x 10 = 20 tokens; adding the 3 would make 30; [3, 2] pads to 6
    assert token_budget_batches([3, 10, 4, 2], 20) == [[1, 2], [0, 3]]
    assert token_budget_batches([30], 8) == [[0]]  # longer than the budget: alone
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        token_budget_batches([1], 0)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    from verl_mega.model_rewards import RewardModel

    causal = make_tiny_hf_model(str(tmp_path / "causal"), "llama", vocab_size=130)
    # was "tensor score.weight (for parameter value_head.weight) not found in ...", which does not say why
    with pytest.raises(ValueError, match=r"reward model .*causal has no score head \(no score\.weight tensor in its "
                                         r"weights\).*trainer\.reward=judge:"):
        RewardModel(causal)
    two = make_tiny_reward_model(str(tmp_path / "two"), "llama", seed=0)
    config = os.path.join(two, "config.json")
    with open(config) as f:
        hf = json.load(f)
    hf["id2label"], hf["label2id"] = {"0": "A", "1": "B"}, {"A": 0, "B": 1}
    with open(config, "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match="has 2 labels"):
        RewardModel(two)


def test_combined_and_fallback_with_plain_functions():
    import asyncio

    from verl_mega.rewards import CombinedReward, FallbackReward, RuleBasedReward, is_collective, score_rewards

    samples = [{"data_source": "gsm8k", "ground_truth": "7"}, {"data_source": "unknown", "ground_truth": "1"}, {}]
    responses = ["#### 7", "#### 1", "abc"]

    def length(response: str) -> float:
        return float(len(response))

    async def slow(response: str) -> float:
        await asyncio.sleep(5)
        return 1.0

    combined = CombinedReward([RuleBasedReward(), length], weights=[2.0, 0.5])
    res = score_rewards(combined, responses, samples, timeout_s=5)
    assert res.scores.tolist() == [2.0 * 1 + 0.5 * 6, 0.5 * 6, 0.5 * 3]  # rule fails on samples 1, 2: 0 from it
    assert res.failures == 2 and all(e.startswith("reward 0: ") for e in res.errors)
    assert res.extras[0] == {"score_0": 1.0, "score_1": 6.0}
    assert not is_collective(combined)
    fallback = score_rewards(FallbackReward(RuleBasedReward(), length), responses, samples, timeout_s=5)
    assert fallback.scores.tolist() == [1.0, 6.0, 3.0] and fallback.failures == 0
    assert [e.get("fallback", False) for e in fallback.extras] == [False, True, True]
    timed_out = score_rewards(FallbackReward(slow, length), responses[:1], samples[:1], timeout_s=0.2)
    assert timed_out.scores.tolist() == [6.0] and timed_out.timeouts == 0  # a timed-out rule falls back too
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        CombinedReward([length, length], weights=[1.0])


def test_config_reward_specs(tmp_path):
    from verl_mega.apps.preflight import load_reward
    from verl_mega.apps.train_cli import load_model_reward
    from verl_mega.config import load_config
    from verl_mega.rollout import get_actor_model
    from verl_mega.model_rewards import LLMJudgerReward, RewardModel
    from verl_mega.model_rewards.judge import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT_TEMPLATE
    from verl_mega.trainer import TrainerConfig

    actor = get_actor_model(make_tiny_hf_model(str(tmp_path / "actor"), "llama", vocab_size=130))
    rm_dir = make_tiny_reward_model(str(tmp_path / "rm"), "qwen2", seed=1)
    cfg = load_config(TrainerConfig, None, [f"model.path={actor.path}", "data.train_path=unused.jsonl",
                                            f"trainer.reward=model:{rm_dir}", "trainer.reward_offload=true"])
    assert load_reward(cfg.trainer.reward) is None  # preflight checks the directory; it loads with the actor
    rm = load_model_reward(cfg.trainer, actor)
    assert isinstance(rm, RewardModel) and rm.offload is not None and rm.layout is actor.layout
    judge_cfg = load_config(TrainerConfig, None, [f"model.path={actor.path}", "data.train_path=unused.jsonl",
                                                  f"trainer.reward=judge:{actor.path}", "trainer.judge_parse=yes/no",
                                                  "trainer.judge_template='Is this right? {response}'",
                                                  "trainer.judge_max_new_tokens=4"])
    judge = load_model_reward(judge_cfg.trainer, actor)  # the judge_* keys reach the judge
    assert isinstance(judge, LLMJudgerReward)
    assert (judge.prompt_template, judge.max_new_tokens) == ("Is this right? {response}", 4)
    assert judge.parse("Yes.") == 1.0 and judge.parse("no") == 0.0
    default = load_model_reward(load_config(TrainerConfig, None, [f"model.path={actor.path}", "data.train_path=x.jsonl",
                                                                  f"trainer.reward=judge:{actor.path}"]).trainer, actor)
    assert (default.prompt_template, default.max_new_tokens) == (DEFAULT_PROMPT_TEMPLATE, DEFAULT_MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_reward("model:")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_reward(f"judge:{tmp_path}")
    # the other kind of model, caught before anything loads, with the spec that would take it
    with pytest.raises(ValueError, match=rf"model: needs a reward model .* holds \['LlamaForCausalLM'\]; for a causal "
                                         rf"language model \(\*ForCausalLM\) use trainer.reward=judge:{actor.path}"):
        load_reward(f"model:{actor.path}")
    with pytest.raises(ValueError, match=rf"judge: needs a causal language model .*use trainer.reward=model:{rm_dir}"):
        load_reward(f"judge:{rm_dir}")


def test_save_hf_round_trip_as_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from verl_mega.rollout import get_actor_model

    src = make_tiny_reward_model(str(tmp_path / "rm"), "llama", seed=2)
    get_actor_model(src, score_head=True).save_hf(str(tmp_path / "out"))
    back = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    ref = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32)
    assert type(back).__name__ == "LlamaForSequenceClassification" and back.config.num_labels == 1
    assert back.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())  # a copy: exact


def test_rows_past_the_context_are_counted_failures(tmp_path):
    """A (prompt, response) longer than the reward model's max_position_embeddings (256) was scored anyway from
    positions the model never learned; it now scores 0 as a counted failure, and the other rows are unchanged."""
    from verl_mega.model_rewards import RewardModel

    rm = RewardModel(make_tiny_reward_model(str(tmp_path / "rm"), "llama", seed=0))
    samples = [{"prompt": "q"}] * 2
    alone = rm.score_batch(samples[:1], ["short"])
    res = rm.score_batch(samples, ["short", "x" * 300])
    assert res.scores[0] == alone.scores[0] and res.scores[1] == 0.0 and res.failures == 1
    assert res.errors[0].startswith("sample 1: ") and "exceed the reward model's max_position_embeddings=256" in res.errors[0]
