"""Host-side bookkeeping of the continuous-batching engine: requests, sequences, blocks, admission.

A request (`add`) is a prompt with its `RequestParams`; it becomes `n` sequences (its samples).
A sequence holds all its tokens (prompt, generated, appended) and how many of them already have
K/V in the cache (`num_cached`); the next forward feeds `tokens[num_cached:]`, so prefill, decode,
resume-after-append and recompute-after-preemption are one mechanism.

Scheduling (vLLM-style, simplified):
  - waiting groups are admitted FIFO at every host check while the running rows stay within
    `max_batch` and the free blocks cover the group's prompt plus one block of growth per running
    row (a watermark against immediate preemption);
  - a fresh request with n > 1 is one prefill row (its "leader"); after the prefill its n - 1
    followers share the leader's full prompt blocks and get a copy of the last partial block
    (`fork`), so the prompt is prefilled once and its blocks are read by all n samples;
  - before a decode window every running row gets the blocks its next `steps` tokens need, after the
    `pending` tokens a window still in flight decodes for it (the engine reads a window's tokens after
    launching the next one); when the pool runs dry the most recently admitted row is preempted (blocks
    freed, tokens kept, back to the front of the queue: recomputed by a later prefill);
  - a finished sequence frees its blocks, unless its request keeps the cache (`keep_cache`): then it
    is paused until `append` adds tokens and re-queues it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from verl_mega.rollout.kv_cache import BlockAllocator
from verl_mega.rollout.sampling import SamplingParams


@dataclass(frozen=True)
class RequestParams:
    """What one request asks for.

    sampling: how tokens are picked; max_new_tokens: response length limit (per turn);
    n: samples of the prompt; stop_token_ids: tokens that end a response (included in it);
    keep_cache: keep a finished sequence's cache so that `append` can resume it (multi-turn).
    """

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    n: int = 1
    stop_token_ids: frozenset = frozenset()
    keep_cache: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


@dataclass(eq=False)  # identity: `in` / `remove` on the running list compare pointers, not every field
class Sequence:
    """One sample of a request; see the module docstring."""

    request_id: int
    sample_index: int
    params: RequestParams
    tokens: list[int]
    response_start: int  # tokens[response_start:] is this turn's response
    order: int  # admission order (preemption picks the latest)
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    images: object = None  # the request's `images.PromptImages` (shared by its samples), None for text
    pending: int = 0  # tokens being decoded by a window in flight, not yet accepted (the engine's look-ahead)
    epoch: int = 0  # bumped when the row leaves the batch (finished, preempted): windows launched before are stale

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.response_start


@dataclass
class Finished:
    """A sequence that finished this turn: its response tokens and their sampler log-probs."""

    request_id: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]


class Scheduler:
    """Queues and block tables; the engine asks it what to run and tells it what came out."""

    def __init__(self, *, max_batch: int, num_blocks: int, block_size: int, share_prefix: bool):
        self.max_batch, self.block_size, self.share_prefix = max_batch, block_size, share_prefix
        self.blocks = BlockAllocator(num_blocks)
        self.waiting: deque[list[Sequence]] = deque()  # groups: [leader, followers...] prefilled together
        self.running: list[Sequence] = []
        self.paused: dict[tuple[int, int], Sequence] = {}
        self._next_id = 0
        self._order = 0
        self.preemptions = 0  # rows evicted (and later recomputed) because the pool ran dry

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: RequestParams, images=None) -> int:
        """Queue a request (with its `PromptImages`, or None); returns its id."""
        rid, self._next_id = self._next_id, self._next_id + 1
        seqs = [Sequence(rid, j, params, list(prompt), len(prompt), 0, images=images) for j in range(params.n)]
        groups = [seqs] if self.share_prefix else [[s] for s in seqs]
        self.waiting.extend(groups)
        return rid

    def append(self, request_id: int, sample_index: int, token_ids: list[int], max_new_tokens: int | None) -> None:
        """Resume a paused sequence with `token_ids` appended (its next response starts after them)."""
        seq = self.paused.pop((request_id, sample_index), None)
        if seq is None:
            raise ValueError(f"request {request_id} sample {sample_index} is not paused (finished with "
                             f"keep_cache=True and not yet appended to or released)")
        seq.tokens += [int(t) for t in token_ids]
        seq.response_start, seq.logprobs, seq.finished = len(seq.tokens), [], False
        if max_new_tokens is not None:
            seq.params = RequestParams(seq.params.sampling, max_new_tokens, 1, seq.params.stop_token_ids, True)
        self.waiting.append([seq])

    def release(self, request_id: int) -> None:
        """Free the cache of the paused samples of a request."""
        for key in [k for k in self.paused if k[0] == request_id]:
            self.blocks.free(self.paused.pop(key).blocks)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ blocks
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for positions [0, num_tokens); False if the pool is short."""
        need = self._blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        new = self.blocks.allocate(need)
        if new is None:
            return False
        seq.blocks += new
        return True

    # ------------------------------------------------------------------ what to run
    def admit(self) -> list[list[Sequence]]:
        """Groups to prefill now (moved to running, blocks for their uncached tokens allocated)."""
        admitted = []
        rows = len(self.running)
        while self.waiting:
            group = self.waiting[0]
            leader = group[0]
            need = self._blocks_for(len(leader.tokens)) - len(leader.blocks) + len(group) + rows
            if rows + len(group) > self.max_batch or (rows and need > self.blocks.num_free):
                break
            if not self._grow(leader, len(leader.tokens)):
                break  # an empty engine that cannot hold one prompt: the engine's admission check prevents it
            self.waiting.popleft()
            for s in group:
                s.order, self._order = self._order, self._order + 1
            self.running += group
            rows += len(group)
            admitted.append(group)
        return admitted

    def fork(self, group: list[Sequence]) -> list[tuple[int, int]]:
        """After the leader's prefill: followers share its full blocks and copy its partial last block.

        Returns the (src, dst) block copies the cache must make."""
        leader, copies = group[0], []
        full = leader.num_cached // self.block_size
        partial = leader.blocks[full:self._blocks_for(leader.num_cached)]
        for seq in group[1:]:
            self.blocks.share(leader.blocks[:full])
            own = self.blocks.allocate(len(partial))
            if own is None:  # admission reserved one block per row; cannot happen
                raise RuntimeError("KV cache pool exhausted while forking a prompt's samples")
            seq.blocks = leader.blocks[:full] + own
            copies += list(zip(partial, own))
            seq.num_cached = leader.num_cached
        return copies

    def reserve(self, steps: int) -> None:
        """Blocks for the next `steps` decode tokens of every running row; preempts the latest rows if short."""
        preempted: set[int] = set()  # ids of the rows this loop evicted
        for seq in sorted(self.running, key=lambda s: s.order):
            if id(seq) in preempted:
                continue
            while not self._grow(seq, len(seq.tokens) - 1 + seq.pending + steps):
                victim = max(self.running, key=lambda s: s.order)
                self._preempt(victim)
                preempted.add(id(victim))
                if victim is seq:
                    break

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks, seq.num_cached, seq.pending, seq.epoch = [], 0, 0, seq.epoch + 1
        self.waiting.appendleft([seq])

    # ------------------------------------------------------------------ what came out
    def accept(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> Finished | None:
        """Record a row's sampled tokens (one decode window's, in order) up to the first that ends its response
        (a stop token, or max_new_tokens reached); returns the finished turn if one did (the later tokens were
        decoded past the end and are dropped)."""
        stops, room = seq.params.stop_token_ids, max(0, seq.params.max_new_tokens - seq.num_generated)
        cut = next((i + 1 for i, token in enumerate(tokens[:room]) if token in stops), min(len(tokens), room))
        seq.tokens += tokens[:cut]
        seq.logprobs += logprobs[:cut]
        if cut == room or (cut > 0 and tokens[cut - 1] in stops):
            return self._finish(seq)
        return None

    def _finish(self, seq: Sequence) -> Finished:
        seq.finished, seq.pending, seq.epoch = True, 0, seq.epoch + 1
        self.running.remove(seq)
        seq.num_cached = len(seq.tokens) - 1  # the last token is fed only if the sequence resumes
        if seq.params.keep_cache:
            keep = self._blocks_for(len(seq.tokens))
            self.blocks.free(seq.blocks[keep:])
            seq.blocks = seq.blocks[:keep]
            self.paused[(seq.request_id, seq.sample_index)] = seq
        else:
            self.blocks.free(seq.blocks)
            seq.blocks = []
        return Finished(seq.request_id, seq.sample_index, seq.tokens[seq.response_start:], list(seq.logprobs))
