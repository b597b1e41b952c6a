"""AgentLoop on the real GenerationEngine of a tiny Qwen2 model whose sampler is scripted (the model's
tokens are forced, the prefill / paged decode / append path is the engine's own): the exact token
sequence and loss mask of a two-turn tool rollout against the chat template's rendering of the same
conversation, tool time overlapping decoding, malformed calls, the turn limit, the tool-call parser."""

import asyncio
import math

import pytest
import torch

from rollout_refs import build_engine
from verl_mega.rollout.agent_loop import AgentLimits, AgentLoop, parse_tool_calls
from verl_mega.tools.base import Tool
from verl_mega.tools.toolset import ToolSet


class AddTool(Tool):
    name, description = "add", "a + b"
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"]}

    async def execute(self, a: int, b: int) -> str:
        return str(a + b)


class WaitForDecodeTool(Tool):
    """Sleeps until the engine has run `steps` more decode steps (or `limit_s` passed); returns how many ran."""
    name, description, parameters = "slow", "waits", {"type": "object", "properties": {}}

    def __init__(self, engine, steps: int = 5, limit_s: float = 10.0):
        self.engine, self.steps, self.limit_s = engine, steps, limit_s

    async def execute(self) -> str:
        start = self.engine.stats["decode_steps"]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while self.engine.stats["decode_steps"] - start < self.steps and loop.time() - t0 < self.limit_s:
            await asyncio.sleep(0.005)
        return str(self.engine.stats["decode_steps"] - start)


def scripted(engine, tokenizer, script: dict[str, list[str]]):
    """Make `engine` emit scripted turns: script[user message] = the text of each assistant turn; the
    turn's tokens are its characters then EOS (the tiny tokenizer is one token per character), forced
    through the engine's `force_tokens` (log-probs: the model's own at the forced tokens); past the
    script, a turn is a lone EOS."""
    eos = tokenizer.eos_token_id
    turns = {}  # (request id, sample) -> turn index
    prompt_of = {}  # request id -> user message
    add_request, append = engine.add_request, engine.append

    def force(rid, sample_index):
        texts = script[prompt_of[rid]]
        turn = turns.get((rid, sample_index), 0)
        ids = tokenizer.encode(texts[turn], add_special_tokens=False) + [eos] if turn < len(texts) else [eos]
        engine.force_tokens(rid, sample_index, ids)

    def add(ids, params=None, **kw):
        rid = add_request(ids, params, **kw)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        prompt_of[rid] = next(u for u in script if u in text)
        for j in range(params.n if params is not None else 1):
            force(rid, j)
        return rid

    def resume(rid, ids, *, sample_index=0, max_new_tokens=None):
        turns[(rid, sample_index)] = turns.get((rid, sample_index), 0) + 1
        append(rid, ids, sample_index=sample_index, max_new_tokens=max_new_tokens)
        force(rid, sample_index)

    engine.add_request, engine.append = add, resume
    return engine


@pytest.fixture
def setup(hf_dir):
    from verl_mega.models.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    engine, _ = build_engine(hf_dir, 1, tok.eos_token_id, max_seq_len=512, max_tokens=4096)
    return engine, tok


CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def test_two_turn_rollout_exact_tokens_and_loss_mask(setup):
    engine, tok = setup
    user = [{"role": "user", "content": "What is 2+3?"}]
    scripted(engine, tok, {"What is 2+3?": [CALL, "The answer is 5."]})
    loop = AgentLoop(engine, tok, ToolSet([AddTool()]), AgentLimits(max_turns=4, max_total_tokens=400))
    (s,) = loop.run([user])
    # reference: the chat template's rendering of the whole conversation
    chat = user + [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "5"},
                   {"role": "assistant", "content": "The answer is 5."}]
    full = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)[:-1]  # drop final "\n"
    prompt = tok.encode(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    assert prompt + s.response_ids == full
    t1 = len(CALL) + 1  # the call's characters + EOS
    glue = len(tok.encode("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False))
    assert glue == 21  # 1 + 1 + 6 + 1 + 1 + 1 + 10: special tokens are one token each
    t2 = len("The answer is 5.") + 1
    assert s.loss_mask == [1] * t1 + [0] * glue + [1] * t2
    assert len(s.logprobs) == len(s.response_ids)
    assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.loss_mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(s.logprobs, s.loss_mask) if m == 1)  # real model log-probs
    assert (s.turns, s.tool_calls, s.tool_errors) == (2, 1, 0)


def test_slow_tool_does_not_stall_other_samples(setup):
    engine, tok = setup
    slow = '<tool_call>{"name": "slow", "arguments": {}}</tool_call>'
    scripted(engine, tok, {"slow one": [slow, "done"], "long one": ["x" * 150]})
    loop = AgentLoop(engine, tok, ToolSet([WaitForDecodeTool(engine, steps=5)]),
                     AgentLimits(max_turns=3, max_total_tokens=400))
    a, b = loop.run([[{"role": "user", "content": "slow one"}], [{"role": "user", "content": "long one"}]])
    # the tool returned after the engine ran >= 5 decode steps for the other sample while it waited; a
    # loop that ran tools serially between engine steps would see 0 and the tool would wait its 10 s limit
    text = tok.decode(a.response_ids, skip_special_tokens=False)
    tool_msg = text.split("<|im_start|>tool\n")[1].split("<|im_end|>")[0]
    assert int(tool_msg) >= 5
    assert a.tool_seconds < 10.0 and (a.turns, b.turns) == (2, 1)
    assert len(b.response_ids) == 151


def test_malformed_call_becomes_error_message(setup):
    engine, tok = setup
    bad = '<tool_call>{"name": "add", "arguments": {"a": 2,}</tool_call>'
    scripted(engine, tok, {"oops": [bad, "sorry"]})
    loop = AgentLoop(engine, tok, ToolSet([AddTool()]), AgentLimits(max_turns=4, max_total_tokens=400))
    (s,) = loop.run([[{"role": "user", "content": "oops"}]])
    text = tok.decode(s.response_ids, skip_special_tokens=False)
    assert "<|im_start|>tool\n[tool error: malformed tool call: not valid JSON" in text
    assert text.endswith("sorry<|im_end|>")
    assert (s.turns, s.tool_calls, s.tool_errors) == (2, 1, 1)


def test_max_turns_respected(setup):
    engine, tok = setup
    scripted(engine, tok, {"loop": [CALL, CALL, CALL, "end"]})
    loop = AgentLoop(engine, tok, ToolSet([AddTool()]), AgentLimits(max_turns=2, max_total_tokens=400))
    (s,) = loop.run([[{"role": "user", "content": "loop"}]])
    assert (s.turns, s.tool_calls) == (2, 1)
    assert s.loss_mask[-(len(CALL) + 1):] == [1] * (len(CALL) + 1)  # ends with the model's second turn
    # the token limit ends a sample too: no room for the tool result after the first turn
    (short,) = loop.__class__(engine, tok, loop.toolset, AgentLimits(max_turns=4, max_total_tokens=len(CALL) + 3)).run(
        [[{"role": "user", "content": "loop"}]])
    assert len(short.response_ids) <= len(CALL) + 3 and short.turns == 1


def test_parse_tool_calls():
    assert parse_tool_calls("no call") == []
    assert parse_tool_calls(CALL + " and " + '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>') == [
        ("add", {"a": 2, "b": 3}), ("f", {"x": 1})]
    assert parse_tool_calls("<tool_call>{\"name\": \"f\"")[0].startswith("malformed tool call: no closing")
    assert parse_tool_calls("<tool_call>[1]</tool_call>")[0].startswith("malformed tool call: expected")
    with pytest.raises(ValueError, match="max_turns"):
        AgentLimits(max_turns=0)


def test_trainer_step_with_tools_trains_only_model_tokens(hf_dir):
    """PPOTrainer(tools=...): the Rollout stage runs the agent loop (scripted sampler on the trainer's own
    engine); the batch's loss mask marks the model's tokens, advantages are 0 on tool/template tokens,
    and the agent/ metrics are reported."""
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer.config import TrainerConfig
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    torch.manual_seed(0)
    cfg = TrainerConfig()
    cfg.rollout.max_turns, cfg.rollout.max_total_tokens = 3, 200
    actor = get_actor_model(hf_dir)
    trainer = PPOTrainer(actor, reward_fn=lambda r: float(r.strip().endswith("5.")), algorithm="reinforce_plus_plus",
                         rollout_batch_size=2, n_samples=1, max_new_tokens=100, lr=1e-4, tools=[AddTool()], config=cfg)
    worker = trainer.worker
    engine = worker.engine(worker.weights.to_inference(), 400, 2)  # the engine the rollout will reuse
    worker.weights.to_train()
    scripted(engine, actor.tokenizer, {"What is 2+3?": [CALL, "The answer is 5."], "Say hi": ["hi"]})
    m = trainer.step([{"prompt": [{"role": "user", "content": "What is 2+3?"}]},
                      {"prompt": [{"role": "user", "content": "Say hi"}]}])
    b = trainer.last_batch
    t1, t2, glue = len(CALL) + 1, len("The answer is 5.") + 1, 21
    assert b.loss_mask[0].tolist() == [1.0] * t1 + [0.0] * glue + [1.0] * t2
    assert b.response_mask[0].sum() == t1 + glue + t2  # every token exists for attention
    assert b.loss_mask[1].tolist() == b.response_mask[1].tolist()  # single-turn row: all model tokens
    assert b.scores.tolist() == [1.0, 0.0]
    tool_tokens = (b.response_mask - b.loss_mask).bool()
    assert (b.advantages[tool_tokens] == 0).all() and (b.advantages[b.loss_mask.bool()] != 0).all()
    assert (m["agent/turns"], m["agent/tool_calls"], m["agent/tool_errors"]) == (1.5, 0.5, 0.0)
    # 113 tokens > max_new_tokens=100 but < max_total_tokens=200, the limit of a tool rollout: not clipped
    assert m["response_length/clip_ratio"] == 0.0
    assert math.isfinite(m["actor/loss"])
    # held-out prompts go through the agent loop too: the call runs and the answer follows (validation used to be
    # single-turn with tools set: the response stopped at the call and scored 0)
    tok = actor.tokenizer
    chat = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok.encode(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    scripted(worker.engine(worker.weights.to_inference(), 400, 2), tok, {"What is 2+3?": [CALL, "The answer is 5."]})
    worker.weights.to_train()
    val = trainer.make_validator([[{"prompt": chat, "prompt_ids": ids}]])()
    assert val["val/reward_mean"] == 1.0 and val["val/response_chars"] == len(CALL + "\ntool\n5\nassistant\nThe answer is 5.")


class BlockingTool(Tool):
    """A tool written wrongly: it blocks its event loop (time.sleep inside async execute), so no time limit
    on that loop can cancel it."""
    name, description, parameters = "block", "blocks", {"type": "object", "properties": {}}

    async def execute(self) -> str:
        import time

        time.sleep(30)
        return "late"


def test_tool_that_blocks_its_event_loop_is_cut_at_the_time_limit(setup):
    """It used to hold the sample (and, with no other sample decoding, the whole rollout) until it returned,
    past rollout.tool_timeout_s and uncounted; a tool that never returned hung training."""
    import time

    from verl_mega.rollout.agent_loop import _ToolRunner

    engine, tok = setup
    call = '<tool_call>{"name": "block", "arguments": {}}</tool_call>'
    scripted(engine, tok, {"hang": [call, "done"]})
    limit_s = 0.5
    loop = AgentLoop(engine, tok, ToolSet([BlockingTool()]), AgentLimits(max_turns=3, max_total_tokens=400,
                                                                         tool_timeout_s=limit_s))
    t0 = time.monotonic()
    (s,) = loop.run([[{"role": "user", "content": "hang"}]])
    # bound: the limit + the grace + decoding ~100 tokens of a tiny model (well under 10 s on a loaded machine),
    # far below the tool's 30 s
    assert time.monotonic() - t0 < limit_s + _ToolRunner.OVERDUE_GRACE_S + 10
    text = tok.decode(s.response_ids, skip_special_tokens=False)
    assert "[tool error: no answer within 0.5 s, and the tool could not be stopped: it blocks its event loop" in text
    assert text.endswith("done<|im_end|>") and (s.turns, s.tool_calls, s.tool_errors) == (2, 1, 1)


def test_a_dead_sandbox_server_ends_the_rollout_with_tools_down(setup):
    """The sandbox server dies mid-run: once `max_unavailable` calls in a row were not run, AgentLoop.run
    raises ToolsDown (the step ends with that message) instead of going on with every call an error."""
    from tests.tools.test_toolset import dead_sandbox_tool
    from verl_mega.tools import ToolsDown

    engine, tok = setup
    call = '<tool_call>{"name": "code_interpreter", "arguments": {"code": "print(1)"}}</tool_call>'
    scripted(engine, tok, {"run it": [call, "done"]})
    loop = AgentLoop(engine, tok, ToolSet([dead_sandbox_tool()], max_unavailable=3),
                     AgentLimits(max_turns=4, max_total_tokens=400))
    with pytest.raises(ToolsDown, match=r"^tool 'code_interpreter': 3 calls in a row were not run"):
        loop.run([[{"role": "user", "content": "run it"}]], n=3)  # the 3 samples' first calls
    assert not engine.has_unfinished()
