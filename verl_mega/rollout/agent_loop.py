"""Multi-turn rollout with tool calls on the generation engine's request API.

What: `AgentLoop(engine, tokenizer, toolset, AgentLimits(...)).run(prompt_ids, n=..., sampling=...)` runs
every sample as a chat: the engine generates an assistant turn until EOS (or the single-token end of a
tool call, `</tool_call>`, where the tokenizer has one); the turn's hermes/Qwen-style tool calls

    <tool_call>{"name": "code_interpreter", "arguments": {"code": "print(1 + 1)"}}</tool_call>

are parsed with `json`; each runs on the `ToolSet` (asyncio, on a background event-loop thread) while the
engine keeps decoding the other samples; when a sample's calls are done their results are rendered as
`tool` messages through the tokenizer's chat template (the conversation is rendered before and after the
new messages and only the new suffix is tokenized) and the sample resumes with `engine.append`, reusing
its KV cache. A call that does not parse becomes an error message to the model and counts as a tool
error. A sample ends when a turn has no tool call, after `max_turns` assistant turns, or when its response
reaches `max_total_tokens`.

Output per sample (`AgentSample`): the response token ids after the prompt (the model's tokens, tool
results and template glue), a `loss_mask` over them (1 = sampled by the model, 0 = tool/template tokens),
the sampler log-probs (0 at mask-0 tokens) and metrics (turns, tool calls, tool errors, tool seconds).

Distributed: every rank of the engine's tensor-parallel group must make the same engine calls. Tools run
on the group's first rank only; which results are applied before each engine step is broadcast from it
(`tp_group`), so the schedules stay identical.

Reference: the hermes tool-call format of Qwen2.5/NousResearch; verl's ToolAgentLoop (suffix tokenization
of tool messages, response mask).

Simplifications: tool messages are tokenized separately from the preceding tokens (a BPE merge across
the boundary is not reproduced); parallel calls of one turn run concurrently and their messages are
appended in call order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from verl_mega.rollout.scheduler import RequestParams
from verl_mega.rollout.sampling import SamplingParams
from verl_mega.tools.base import ToolsDown

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
TOOL_CALL_END = "</tool_call>"


@dataclass(frozen=True)
class AgentLimits:
    """Per-sample limits: assistant turns, response tokens (model + tool + template), seconds per tool call."""

    max_turns: int = 4
    max_total_tokens: int = 512
    tool_timeout_s: float | None = 30.0

    @classmethod
    def from_rollout_config(cls, rollout) -> "AgentLimits":
        """From a `rollout` config section: max_turns, max_total_tokens (None: max_new_tokens), tool_timeout_s."""
        return cls(max_turns=rollout.max_turns, max_total_tokens=rollout.max_total_tokens or rollout.max_new_tokens,
                   tool_timeout_s=rollout.tool_timeout_s)

    def __post_init__(self) -> None:
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {self.max_turns!r}")
        if not isinstance(self.max_total_tokens, int) or self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be an integer >= 1, got {self.max_total_tokens!r}")
        if self.tool_timeout_s is not None and self.tool_timeout_s <= 0:
            raise ValueError(f"tool_timeout_s must be > 0 or None, got {self.tool_timeout_s!r}")


@dataclass
class AgentSample:
    """One finished multi-turn sample; see the module docstring. All lists have the same length."""

    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """The sample's `agent/...` metrics."""
        return {"agent/turns": float(self.turns), "agent/tool_calls": float(self.tool_calls),
                "agent/tool_errors": float(self.tool_errors), "agent/tool_seconds": self.tool_seconds}


def parse_tool_calls(text: str) -> list[tuple[str, Any] | str]:
    """The tool calls in an assistant turn: (name, arguments) for each well-formed
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, an error message (str) for a malformed one
    (unclosed, not JSON, no string "name", arguments neither an object nor a JSON string of one)."""
    calls: list[tuple[str, Any] | str] = []
    for m in TOOL_CALL_RE.finditer(text):
        body, closed = m.group(1).strip(), bool(m.group(2))
        if not closed:
            calls.append(f"malformed tool call: no closing {TOOL_CALL_END}")
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"malformed tool call: not valid JSON ({e.msg} at char {e.pos})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('malformed tool call: expected {"name": <string>, "arguments": {...}}')
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # some models emit the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                calls.append("malformed tool call: arguments is a string that is not JSON")
                continue
        calls.append((call["name"], args))
    return calls


class ChatRenderer:
    """Tokens to append after an assistant turn for new messages, through the tokenizer's chat template.

    The conversation (with the assistant turn as generated) is rendered as text before and after the new
    messages (the latter with the generation prompt); the difference is the suffix. The model's turn ended
    with its stop token or not at all (a length or `</tool_call>` stop): the template's closing of the
    assistant message that the model did not produce (e.g. the newline after `<|im_end|>`) is prepended.
    """

    def __init__(self, tokenizer, tool_schemas: list[dict] | None = None):
        self.tokenizer, self.tools = tokenizer, tool_schemas or None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        kw = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kw)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt tokens of a chat (the tools' schemas included, generation prompt appended)."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def suffix_ids(self, messages: list[dict], turn_text: str, new_messages: list[dict]) -> list[int]:
        """Tokens that follow an assistant turn whose generated text (special tokens included) is
        `turn_text` in chat `messages` (ending with that assistant message) to add `new_messages` and the
        next generation prompt."""
        before = self.render(messages, add_generation_prompt=False)
        after = self.render(messages + new_messages, add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template does not render the conversation as a prefix of its continuation "
                             "(templates that rewrite earlier turns cannot be used for multi-turn rollout)")
        content = messages[-1]["content"]
        at = before.rfind(content)
        closing = before[at + len(content):] if at >= 0 else ""
        produced = turn_text[len(content):] if turn_text.startswith(content) else ""
        glue = closing[len(produced):] if produced and closing.startswith(produced) else closing
        return self.encode(glue + after[len(before):])


class _Chat:
    """A sample's state across turns."""

    def __init__(self, messages: list[dict], sample: AgentSample):
        self.messages, self.sample = messages, sample
        self.turn_text = ""  # the last assistant turn as generated (special tokens included)


class AgentLoop:
    """Run multi-turn samples with tool calls on a `GenerationEngine`; see the module docstring.

    engine: the generation engine (its request API: add_request / step / append / release_request).
    tokenizer: a HF tokenizer with a chat template. toolset: `verl_mega.tools.ToolSet`.
    limits: `AgentLimits`. tp_group: the engine's tensor-parallel group (None: one rank).
    """

    def __init__(self, engine, tokenizer, toolset, limits: AgentLimits | None = None, *, tp_group=None):
        self.engine, self.tokenizer, self.toolset = engine, tokenizer, toolset
        self.limits = limits or AgentLimits()
        self.tp_group = tp_group
        self.renderer = ChatRenderer(tokenizer, toolset.schemas())
        end = tokenizer.convert_tokens_to_ids(TOOL_CALL_END) if TOOL_CALL_END in tokenizer.get_vocab() else None
        self.stop_ids = frozenset([end]) if end is not None else frozenset()

    # ------------------------------------------------------------------ public
    def run(self, prompts: list, *, n: int = 1, sampling: SamplingParams | None = None,
            seed: int = 0) -> list[AgentSample]:
        """n multi-turn samples per prompt; rows i*n .. i*n+n-1 belong to prompt i. Collective over `tp_group`.

        prompts: chats (lists of messages, rendered with the tools' schemas) or token-id lists already
        rendered with the generation prompt (a dataset's prompts; the tool messages that follow only
        depend on the template's handling of the last turn, so the chat state starts from a stand-in
        user message)."""
        sampling = sampling or SamplingParams()
        self.engine.seed(seed)
        lim = self.limits
        chats: dict[tuple[int, int], _Chat] = {}
        rows: list[tuple[int, int]] = []
        for prompt in prompts:
            if prompt and isinstance(prompt[0], dict):
                messages, ids = prompt, self.renderer.prompt_ids(prompt)
            else:
                messages, ids = [{"role": "user", "content": "(prompt)"}], [int(t) for t in prompt]
            rid = self.engine.add_request(ids, RequestParams(sampling, lim.max_total_tokens, n, self.stop_ids,
                                                             keep_cache=True))
            for k in range(n):
                chats[(rid, k)] = _Chat([dict(m) for m in messages], AgentSample())
                rows.append((rid, k))
        runner = _ToolRunner(self.toolset, lead=self._is_lead())
        try:
            self._loop(chats, runner)
        except BaseException:
            self.engine.release()  # an interrupted rollout (ToolsDown, Ctrl-C) leaves no queued or running rows
            raise
        finally:
            runner.close()
            for rid in {r for r, _ in rows}:
                self.engine.release_request(rid)
        return [chats[key].sample for key in rows]

    # ------------------------------------------------------------------ internals
    def _is_lead(self) -> bool:
        return self.tp_group is None or dist.get_world_size(self.tp_group) == 1 or dist.get_rank(self.tp_group) == 0

    def _loop(self, chats: dict, runner: "_ToolRunner") -> None:
        pending: set[tuple[int, int]] = set()  # samples waiting for tool results
        while self.engine.has_unfinished() or pending:
            if self.engine.has_unfinished():
                for done in self.engine.step():
                    key = (done.request_id, done.sample_index)
                    if self._finish_turn(chats[key], key, done.token_ids, done.logprobs, runner):
                        pending.add(key)
                block = not self.engine.has_unfinished()
            else:
                block = True
            for key, results in self._collect(runner, block=block and bool(pending)):
                pending.discard(key)
                self._resume(chats[key], key, results)

    def _finish_turn(self, chat: _Chat, key, token_ids: list[int], logprobs: list[float], runner) -> bool:
        """Record a finished assistant turn; start its tool calls. True if the sample waits for tools."""
        s, lim = chat.sample, self.limits
        s.response_ids += token_ids
        s.loss_mask += [1] * len(token_ids)
        s.logprobs += list(logprobs)
        s.turns += 1
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        content = self._content(token_ids)
        chat.messages.append({"role": "assistant", "content": content})
        chat.turn_text = text
        calls = parse_tool_calls(content)
        if not calls or s.turns >= lim.max_turns or len(s.response_ids) >= lim.max_total_tokens:
            return False
        s.tool_calls += len(calls)
        runner.submit(key, calls, self.limits.tool_timeout_s)
        return True

    def _content(self, token_ids: list[int]) -> str:
        """The assistant message text of a turn: its tokens decoded, a final stop token (EOS) dropped."""
        ids = list(token_ids)
        if ids and ids[-1] in self.engine.eos_token_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _collect(self, runner, block: bool) -> list[tuple[tuple[int, int], list]]:
        """Tool results ready now (waiting for one if `block`), the same list on every rank of the group;
        `ToolsDown` (the tools' backend is gone) is raised on every rank of the group."""
        try:
            ready = runner.ready(block) if self._is_lead() else None
        except ToolsDown as e:
            ready = e
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            box = [ready]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            ready = box[0]
        if isinstance(ready, ToolsDown):
            raise ready
        return ready

    def _resume(self, chat: _Chat, key, results: list) -> None:
        """Append the tool messages of a sample's calls and let it continue (or end it at the token limit)."""
        s, lim = chat.sample, self.limits
        new = [{"role": "tool", "content": r.text} for r in results]
        s.tool_errors += sum(r.error for r in results)
        s.tool_seconds += sum(r.seconds for r in results)
        suffix = self.renderer.suffix_ids(chat.messages, chat.turn_text, new)
        chat.messages += new
        room = lim.max_total_tokens - len(s.response_ids) - len(suffix)
        if room < 1:
            return  # no room left for another turn: the sample ends after the model's last turn
        s.response_ids += suffix
        s.loss_mask += [0] * len(suffix)
        s.logprobs += [0.0] * len(suffix)
        self.engine.append(key[0], suffix, sample_index=key[1], max_new_tokens=room)


@dataclass
class _Error:
    """A malformed call's result (same fields as `ToolCallResult`)."""

    text: str
    error: bool = True
    seconds: float = 0.0


class _ToolRunner:
    """Runs each sample's tool calls on a background asyncio loop; `ready()` hands back finished samples.
    On a non-lead rank it runs nothing (results come from the lead rank).

    A call past its time limit is cancelled on the loop; a tool that blocks the loop itself (`time.sleep` or
    blocking I/O inside `async execute`) cannot be cancelled, so `ready()` also ends a sample's wait
    `OVERDUE_GRACE_S` after its limit with an error result, and `close()` leaves that loop's thread behind
    instead of waiting for it: the rollout goes on, the calls count as tool errors."""

    OVERDUE_GRACE_S = 2.0  # beyond the time limit: a loop that is not blocked answers a timed-out call in ms

    def __init__(self, toolset, lead: bool):
        self.toolset, self.lead = toolset, lead
        self.futures: dict[tuple[int, int], concurrent.futures.Future] = {}
        self.limits: dict[tuple[int, int], tuple[float, float, int]] = {}  # key -> (submitted at, time limit, calls)
        self.blocked = False  # a tool blocked the loop past a deadline
        self.loop = asyncio.new_event_loop() if lead else None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True) if lead else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, key, calls: list, timeout_s: float | None) -> None:
        if not self.lead:
            return

        async def one(call):
            if isinstance(call, str):
                return _Error(f"[tool error: {call}]")
            name, args = call
            try:
                return await asyncio.wait_for(self.toolset.call(name, args), timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                return _Error(f"[tool error: {name!r} did not answer within {timeout_s:g} s]", seconds=timeout_s)

        async def all_calls():
            return list(await asyncio.gather(*(one(c) for c in calls)))

        self.futures[key] = asyncio.run_coroutine_threadsafe(all_calls(), self.loop)
        if timeout_s is not None:
            self.limits[key] = (time.monotonic(), timeout_s, len(calls))

    def ready(self, block: bool) -> list:
        if block and self.futures:
            deadlines = [self._deadline(k) for k in self.futures if k in self.limits]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            concurrent.futures.wait(self.futures.values(), timeout=wait_s, return_when=concurrent.futures.FIRST_COMPLETED)
        now, out = time.monotonic(), []
        for k in sorted(self.futures):
            if self.futures[k].done():
                out.append((k, self.futures.pop(k).result()))
            elif k in self.limits and now >= self._deadline(k):
                submitted, limit, calls = self.limits[k]
                self.futures.pop(k).cancel()
                self.blocked = True
                message = (f"[tool error: no answer within {limit:g} s, and the tool could not be stopped: it blocks "
                           f"its event loop (time.sleep or blocking I/O inside async execute?)]")
                out.append((k, [_Error(message, seconds=now - submitted)] * calls))
        for k, _ in out:
            self.limits.pop(k, None)
        return out

    def _deadline(self, key) -> float:
        submitted, limit, _ = self.limits[key]
        return submitted + limit + self.OVERDUE_GRACE_S

    def close(self) -> None:
        if self.loop is None:
            return
        for f in self.futures.values():
            f.cancel()
        if self.blocked:  # the loop's thread is stuck in a tool: left behind (a daemon), not waited for
            self.loop.call_soon_threadsafe(self.loop.stop)
            return
        # the tools' HTTP sessions belong to this loop: closed on it (an unclosed one warns at exit); a close that
        # fails or stalls is reported, not raised: it would hide the error that ended the rollout (e.g. ToolsDown)
        try:
            asyncio.run_coroutine_threadsafe(self.toolset.aclose(), self.loop).result(timeout=10)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"closing the tools' sessions failed: {type(e).__name__}: {e}")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def agent_rollout(worker, tokenizer, toolset, limits: AgentLimits, prompt_ids: list[list[int]], *, n: int,
                  sampling: SamplingParams, seed: int = 0) -> tuple[list[AgentSample], dict[str, float]]:
    """Multi-turn samples for `prompt_ids` (B rendered prompts, the same on every rank of the model-parallel
    group) on a `RolloutWorker`'s inference model: the weights are handed over, each inference replica runs
    its share of the prompts through an `AgentLoop` on the worker's engine, the rows are gathered back
    (prompt-major, B * n). Returns (samples, timings {"reshard", "generate"} seconds). Collective."""
    def run(model, first: int, mine: list[list[int]]) -> list[AgentSample]:
        rep = worker.replicas
        engine = worker.engine(model, max(map(len, mine)) + limits.max_total_tokens, len(mine) * n)
        loop = AgentLoop(engine, tokenizer, toolset, limits, tp_group=rep.tp_group)
        samples = loop.run(mine, n=n, sampling=sampling, seed=(seed + 7919 * rep.micro_dp_rank) % 2**62)
        if worker.free_cache:
            engine.release()
        return samples

    return worker.run_on_replicas(prompt_ids, run)


def agent_metrics(samples: list[AgentSample]) -> dict[str, float]:
    """Means of the samples' `agent/...` metrics (turns, tool calls, tool errors, tool seconds)."""
    if not samples:
        return {}
    per = [s.metrics() for s in samples]
    return {k: sum(m[k] for m in per) / len(per) for k in per[0]}
