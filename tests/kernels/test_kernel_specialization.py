"""Triton compiles a kernel once per specialisation of its arguments (an integer divisible by 16 or equal to
1, a pointer 16-byte aligned or not), so an argument that follows the micro-batch's size makes new binaries
in the middle of training whenever a size first meets another residue (a stall of 0.1-0.9 s each on an
H100). These tests record the key Triton computes for every launch (`native_specialize_impl`, the function
its launcher calls, with each kernel's do_not_specialize settings) over many sizes: the keys may differ only
in constexpr meta-parameters, which take a few values whatever the sizes.
"""

import collections
import inspect

import torch
import triton.language as tl  # a pinned test dependency (setup.py's "test" extra): missing, the tests fail loudly
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from verl_mega.kernels import fused_logprob_entropy

CUDA = torch.cuda.is_available()


def _settings(kernel, name: str) -> set:
    """A kernel's do_not_specialize / do_not_specialize_on_alignment names (compiled or interpreted)."""
    value = getattr(kernel, name, None) if not hasattr(kernel, "kwargs") else kernel.kwargs.get(name)
    return set(value or ())


class SpecializationRecorder:
    """Pre-run hooks on each of `kernels` ({name: Triton kernel}): keys[kernel name] = {(constexpr part, specialised
    part)} of the launches seen. Hooks stay installed (Triton has no remove); `active` switches recording."""

    def __init__(self, kernels: dict):
        self.keys, self.active = collections.defaultdict(set), False
        for name, kernel in kernels.items():
            kernel.add_pre_run_hook(self._hook(name, kernel))

    def _hook(self, name, kernel):
        params = list(inspect.signature(kernel.fn).parameters.values())
        dns, dns_align = _settings(kernel, "do_not_specialize"), _settings(kernel, "do_not_specialize_on_alignment")

        def hook(*args, **kwargs):
            if not self.active:
                return
            bound = {**dict(zip((p.name for p in params), args)), **kwargs}
            const, spec = [], []
            for p in params:
                value = bound.get(p.name, p.default)
                if p.annotation in (tl.constexpr, "tl.constexpr"):
                    const.append((p.name, value))
                else:
                    spec.append((p.name, *native_specialize_impl(BaseBackend, value, False, p.name not in dns,
                                                                 p.name not in dns_align)))
            self.keys[name].add((tuple(const), tuple(spec)))
        return hook

    def size_variants(self) -> dict[str, list]:
        """Per kernel, the constexpr settings launched with more than one specialisation (should be none)."""
        out = {}
        for name, keys in self.keys.items():
            by_const = collections.defaultdict(set)
            for const, spec in keys:
                by_const[const].add(spec)
            bad = [sorted(specs) for specs in by_const.values() if len(specs) > 1]
            if bad:
                out[name] = bad
        return out


_RECORDERS = {}


def _recorder(namespace: dict) -> SpecializationRecorder:
    """The recorder of every launched kernel (a `*_kernel` name) in `namespace` (a module's `vars`, or a dict)."""
    kernels = {name: k for name, k in namespace.items()
               if hasattr(k, "add_pre_run_hook") and hasattr(k, "fn") and name.endswith("_kernel")}
    key = tuple(sorted((name, id(k)) for name, k in kernels.items()))
    if key not in _RECORDERS:  # one set of hooks per kernel set for the whole session
        _RECORDERS[key] = SpecializationRecorder(kernels)
    return _RECORDERS[key]


def test_row_counts_and_chunks_add_no_logprob_kernel_variants():
    # Row counts of every residue class that matters (1, divisible by 16, by 4, by 2, odd), with the default
    # chunking (whose width, label offsets and kept-logit width follow the row count) and a fixed one, with and
    # without gradients: one binary per constexpr setting.
    from verl_mega.kernels import logprob_triton
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    rec = _recorder(vars(logprob_triton))
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 64, generator=g) * 0.3).to(dtype).to(device)
    rec.active = True
    try:
        for n in (1, 16, 17, 30, 36, 48, 51, 64, 70, 97):
            hidden = torch.randn(n, 64, generator=g).to(dtype).to(device)
            labels = torch.randint(0, 300, (n,), generator=g).to(device)
            for chunk_size in (None, 128):
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                lp, ent = fused_logprob_entropy(h, w, labels, impl="triton", chunk_size=chunk_size)
                (lp.sum() + ent.sum()).backward()
            with torch.no_grad():
                fused_logprob_entropy(hidden, weight, labels, impl="triton")
    finally:
        rec.active = False
    assert {"_fwd_kernel", "_rows_kernel", "_bwd_kernel", "_label_grad_kernel", "_kept_grad_kernel"} <= set(rec.keys)
    assert rec.size_variants() == {}, rec.size_variants()


def test_warm_up_compiles_every_logprob_variant_a_run_meets(monkeypatch):
    # Packed micro-batches have any token count, and the kernels' launch choices (tile sizes, masked launches, the
    # kept first chunk, entropy gradients) follow it: the trainer runs `warm_up_logprob_kernels` on its LM head
    # before the first step, and every key launched after it, at any count, must be one the warm-up launched
    # (on CPU, where the warm-up itself does nothing, the calls it makes on CUDA: `launch_each_regime`).
    from verl_mega.kernels import logprob_triton, warm_up_logprob_kernels
    from verl_mega.kernels.logprob import launch_each_regime
    if CUDA:  # the real thresholds; a vocabulary whose kept first chunk at 4096 tokens is not all of it
        device, dtype, vocab, counts = "cuda", torch.bfloat16, 151936, (1, 100, 1000, 1025, 2000, 4095, 5000, 9000)
    else:  # the interpreter (fixed tiles): the same regimes at counts it runs quickly
        monkeypatch.setattr(logprob_triton, "SMALL_MAX_ROWS", 32)
        monkeypatch.setattr(logprob_triton, "UNMASKED_MIN_ROWS", 64)
        device, dtype, vocab, counts = "cpu", torch.float32, 300, (1, 5, 17, 31, 33, 50, 63, 90)
    rec = _recorder(vars(logprob_triton))
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, 64, generator=g) * 0.3).to(dtype).to(device)
    rec.keys.clear()
    rec.active = True
    try:
        assert CUDA or warm_up_logprob_kernels(weight, impl="triton") == 0  # nothing to compile off CUDA
        warm_up = warm_up_logprob_kernels if CUDA else launch_each_regime
        assert warm_up(weight, impl="triton") == 9
        warmed = {name: set(keys) for name, keys in rec.keys.items()}
        for n in counts:
            hidden = torch.randn(n, 64, generator=g).to(dtype).to(device)
            labels = torch.randint(0, vocab, (n,), generator=g).to(device)
            with torch.no_grad():
                fused_logprob_entropy(hidden, weight, labels, impl="triton", compute_entropy=False)
            for with_entropy in (False, True):
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                lp, ent = fused_logprob_entropy(h, w, labels, impl="triton")
                (lp.sum() + ent.sum() if with_entropy else lp.sum()).backward()
    finally:
        rec.active = False
    assert {"_fwd_kernel", "_rows_kernel", "_kept_grad_kernel"} <= set(warmed)
    unwarmed = {name: new for name, keys in rec.keys.items() if (new := keys - warmed.get(name, set()))}
    assert unwarmed == {}, unwarmed


def test_batch_and_length_add_no_advantage_kernel_variants():
    # Batch rows and padded response widths change from step to step: GAE, discounted returns and the group
    # kernels get one binary per tile setting (a power of two per length bucket), whatever B, T and G are.
    from verl_mega.kernels import advantage_triton
    device = "cuda" if CUDA else "cpu"
    rec = _recorder(vars(advantage_triton))
    g = torch.Generator().manual_seed(0)
    rec.active = True
    try:
        for b, t in ((8, 33), (16, 48), (17, 40), (32, 64), (12, 50), (1, 64)):
            rewards, values = (torch.randn(b, t, generator=g).to(device) for _ in range(2))
            mask = (torch.rand(b, t, generator=g) > 0.2).float().to(device)
            advantage_triton.gae(rewards, values, mask, 0.99, 0.95)
            advantage_triton.discounted_returns(rewards, mask, 0.99)
            advantage_triton.group_normalise(rewards[:, 0].contiguous().repeat(4), 4, advantage_triton.GRPO, 1e-6)
    finally:
        rec.active = False
    assert {"_gae_kernel", "_returns_kernel", "_group_kernel"} <= set(rec.keys)
    assert rec.size_variants() == {}, rec.size_variants()


def test_decode_batch_sizes_add_no_sampler_kernel_variants():
    # The rollout engine samples every decode step's rows: their count changes as sequences finish and join, the
    # vocabulary splits follow it (`vocab_splits`, 1 off CUDA, so passed here), the forced ids are a column of a
    # wider tensor and the seed a slice of a window's seed buffer: one binary per (greedy, forced) setting.
    from verl_mega.rollout import fused_sampling
    from verl_mega.rollout.sampling import SamplingParams
    device = "cuda" if CUDA else "cpu"
    partial, merge = fused_sampling._kernels()
    greedy = SamplingParams(temperature=0.0)
    rec = _recorder({"sample_partial_kernel": partial, "sample_merge_kernel": merge})
    g = torch.Generator().manual_seed(0)
    block, vocab = 64, 5 * 64 - 9  # five blocks, so up to 4 splits (small: the interpreter runs every row)
    seeds = torch.randint(0, 2**31 - 1, (8,), generator=g).to(device)
    rec.active = True
    try:
        for i, (rows, splits) in enumerate(((1, 4), (3, 4), (16, 2), (17, 2), (6, 1), (9, 1), (5, 2), (32, 1))):
            logits = torch.randn(rows, vocab, generator=g).to(device)
            forced = torch.full((rows, 3), -1, dtype=torch.long).to(device)[:, i % 3]
            for params, with_forced in ((greedy, True), (SamplingParams(temperature=0.7), False)):
                fused_sampling.sample_tokens_fused(logits, params, forced=forced if with_forced else None,
                                                   seed=seeds[i:i + 1], block=block, splits=splits)
    finally:
        rec.active = False
    assert set(rec.keys) == {"sample_partial_kernel", "sample_merge_kernel"}
    assert rec.size_variants() == {}, rec.size_variants()
