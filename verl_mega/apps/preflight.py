"""Checks `verl-mega train` runs before it loads a model (which takes minutes with a real one).

`preflight(cfg, world_size)` checks, in order, and raises a ValueError naming the config key:
  1. the launch: the world size is a multiple of parallel.tp x parallel.pp (and says how to launch);
  2. trainer.output_dir is (or can become) a writable directory;
     the model directory: config.json present, heads / layers divisible by tp / pp (model.path), and of
     the shapes of the checkpoint in trainer.output_dir that the run would resume;
  3. the data: the file opens, every row parses and has the prompt column (data.train_path,
     data.prompt_key; the error names the file and the row), and it gives at least one batch per
     data-parallel rank (trainer.rollout_batch_size), and its longest prompt plus rollout.max_new_tokens fits
     the model's max_position_embeddings, and a checkpoint the run would resume saved its data position
     for this many prompts and this trainer.seed; the same for data.val_path when validation is on;
  4. the tools (rollout.tools): a chat template in the model's tokenizer, known names, arguments their
     constructors take, no row with images, and each code tool's sandbox
     (local, or the server at its sandbox_fusion_url) runs print(1);
  5. the reward: `trainer.reward` imports (within trainer.reward_timeout_s), and a "rule" reward has a checker for
     every data_source in the data and a ground truth (reward_model.ground_truth) in every row; a "model:PATH" /
     "judge:PATH" reward holds a model of its kind, with a tokenizer, that the actor's parallel.tp (and, a reward
     model, pp) can split;
  6. the weights: model.safetensors (or the index and every shard it names) exist under model.path (and a model
     reward's PATH; a reward model has one label and a score head).
It returns the tokenized datasets and the reward callable, which training then uses as they are.
Only the tokenizer is loaded (seconds); the weights are not touched.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import re
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from verl_mega.trainer.config import TrainerConfig, model_reward


@dataclass
class Prepared:
    """What the checks built: the prompt dataset (an RLDataset) and the reward callable."""

    dataset: Any
    reward_fn: Callable | None  # None: a model reward ("model:PATH" / "judge:PATH"), loaded with the actor
    val_dataset: Any = None  # data.val_path's RLDataset when validation is on, else None


def load_reward(spec: str, import_timeout_s: float | None = None) -> Callable | None:
    """The reward callable named by `spec` ("rule", "module:function" or "file.py:function"); for a model
    reward ("model:PATH", "judge:PATH") the directory is checked and None returned (it loads on the actor's layout).
    A module whose import runs past `import_timeout_s` seconds (None: no limit) is a ValueError naming it."""
    if spec == "rule":
        from verl_mega.rewards.base import RuleBasedReward

        return RuleBasedReward()
    if (named := model_reward(spec)) is not None:
        path = named[1]
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"trainer.reward={spec!r}: {path or '(empty)'} is not a Hugging Face model directory "
                             f"(no config.json)")
        check_reward_architecture(spec)
        return None
    if ":" not in spec:
        raise ValueError(f"trainer.reward={spec!r}: use 'rule', 'package.module:function' or 'file.py:function'")
    target, name = spec.rsplit(":", 1)
    if not target or not name:
        raise ValueError(f"trainer.reward={spec!r}: give both the module (or .py file) and the function, "
                         f"'package.module:function' or 'file.py:function'")
    if target.endswith(".py") and not os.path.isfile(target):
        raise ValueError(f"trainer.reward: file {target} does not exist")
    try:
        module = _import_reward_module(target, import_timeout_s)
    except TimeoutError:
        raise ValueError(f"trainer.reward={spec!r}: importing {target} did not finish within {import_timeout_s:g} s "
                         f"(trainer.reward_timeout_s); a loop or a long computation at import? Raise "
                         f"trainer.reward_timeout_s if it is only slow") from None
    except Exception as exc:  # the user's module failed to import: its error, where it was raised, no traceback
        raise ValueError(f"trainer.reward={spec!r}: cannot import {target}: {_where(exc)}{type(exc).__name__}: "
                         f"{exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"trainer.reward: {target} has no callable {name!r}")
    return fn


_REWARD_ARCHITECTURES = {"model": ("ForSequenceClassification", "a reward model (*ForSequenceClassification)"),
                         "judge": ("ForCausalLM", "a causal language model (*ForCausalLM)")}


def check_reward_architecture(spec: str) -> None:
    """ValueError when the config.json of a "model:PATH" / "judge:PATH" reward names architectures of the other
    kind (a causal LM given as a reward model, or the reverse); a config without `architectures` passes."""
    import json

    kind, path = model_reward(spec)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    suffix, wanted = _REWARD_ARCHITECTURES[kind]
    if architectures and not any(a.endswith(suffix) for a in architectures):
        other = "judge" if kind == "model" else "model"
        hint = (f"; for {_REWARD_ARCHITECTURES[other][1]} use trainer.reward={other}:{path}"
                if any(a.endswith(_REWARD_ARCHITECTURES[other][0]) for a in architectures) else "")
        raise ValueError(f"trainer.reward={spec!r}: {kind}: needs {wanted}, but {path} holds {architectures}{hint}")


def _import_reward_module(target: str, timeout_s: float | None = None):
    """The module of a reward spec: a file path ending in .py, or a dotted module name. The import runs in a
    daemon thread, as sync reward calls do (rewards.base), and TimeoutError is raised after `timeout_s`
    seconds; a hung import is abandoned there (Python cannot stop a thread), still running until the process
    exits: `verl-mega train` exits with the error."""
    if timeout_s is None:
        return _import_now(target)
    box: dict = {}

    def work():
        try:
            box["module"] = _import_now(target)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=work, name="reward-import", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"importing {target} took more than {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["module"]


def _import_now(target: str):
    if not target.endswith(".py"):
        return importlib.import_module(target)
    module_spec = importlib.util.spec_from_file_location("verl_mega_user_reward", target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _where(exc: BaseException) -> str:
    """"FILE:LINE: " of the innermost frame of the user's code that raised `exc` ("" when there is none, e.g. a
    module that is not found, or for a SyntaxError, whose message says where)."""
    if isinstance(exc, SyntaxError):
        return ""
    ours = os.path.dirname(os.path.abspath(importlib.__file__)), os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(ours)]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""


def launch_command(cfg: TrainerConfig) -> str:
    """How to start a run of this layout (for error messages)."""
    mp = cfg.parallel.tp * cfg.parallel.pp
    return (f"`verl-mega train CONFIG.yaml ...` (without torchrun it starts {mp} processes itself; --nproc N "
            f"for N = a multiple of {mp}), or `torchrun --nproc-per-node {mp} -m verl_mega train CONFIG.yaml ...`")


def check_launch(cfg: TrainerConfig, world_size: int) -> None:
    """ValueError unless `world_size` processes can hold whole tp x pp model replicas."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp):
        raise ValueError(f"parallel.tp={tp} x parallel.pp={pp} needs a multiple of {tp * pp} processes (one model "
                         f"replica), but {world_size} process(es) were started (WORLD_SIZE). Launch with "
                         f"{launch_command(cfg)}")


def check_model(cfg: TrainerConfig) -> None:
    """ValueError if model.path is not a HF directory or its shapes cannot be split by parallel.tp / pp."""
    from verl_mega.models.hf_io import check_hf_dir

    try:
        path = check_hf_dir(cfg.model.path)
    except FileNotFoundError as exc:
        raise ValueError(f"model.path: {exc}") from None
    check_fits(path, cfg.parallel.tp, cfg.parallel.pp, f"the model at model.path={path}", "model.path")


def check_fits(path: str, tp: int, pp: int, what: str, key: str) -> None:
    """ValueError if the HF model at `path` (`what`, under config `key`) cannot be split by tp / pp."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.parallelize import stage_layer_range

    try:
        config = ModelConfig.from_hf(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{key}={path}: cannot read its config.json: {exc}") from None
    try:
        config.check_tp(tp)
    except ValueError as exc:
        raise ValueError(f"parallel.tp={tp} does not fit {what}: {exc}; "
                         f"choose a tp dividing num_heads={config.num_heads} and num_kv_heads={config.num_kv_heads}"
                         ) from None
    try:
        stage_layer_range(config.num_layers, pp, 0)
    except ValueError as exc:
        raise ValueError(f"parallel.pp={pp} does not fit {what}: {exc}") from None


def load_dataset(cfg: TrainerConfig, tokenizer, key: str = "train_path"):
    """The RLDataset of `cfg.data.<key>` ("train_path" or "val_path"); ValueError naming data.<key> /
    data.prompt_key and the row."""
    from verl_mega.data.dataset import RLDataset
    from verl_mega.models.config import ModelConfig
    from verl_mega.trainer.vision_data import image_processor_for

    d, name = cfg.data, f"data.{key}"
    path = getattr(d, key)
    processor = image_processor_for(cfg.model.path, ModelConfig.from_hf(cfg.model.path))  # None: a text model
    try:
        dataset = RLDataset(path, tokenizer, prompt_key=d.prompt_key, max_prompt_length=d.max_prompt_length,
                            apply_chat_template=d.apply_chat_template,
                            **({} if processor is None else {"image_processor": processor}))
    except ValueError as exc:
        about_prompt = re.search(rf"row \d+: (no )?{re.escape(repr(d.prompt_key))}", str(exc))  # not a column list
        hint = (f" (data.prompt_key={d.prompt_key!r} names the prompt column: set it to the column holding the "
                f"chat messages)") if about_prompt else ""
        if processor is None and "pass image_processor=" in str(exc):  # the library's advice, in CLI terms
            exc = str(exc).split(": pass image_processor=")[0]
            hint = (f" but model.path={cfg.model.path} is a text model (no image processor); train a vision-language "
                    f"model (Qwen2.5-VL) on it, or drop the images column")
        where = name if str(path) in str(exc) else f"{name}={path}"
        raise ValueError(f"{where}: {exc}{hint}") from None
    except OSError as exc:  # an unreadable or non-parquet file
        raise ValueError(f"{name}={path}: cannot read it: {exc}") from None
    if len(dataset) == 0 and dataset.filtered == 0:
        raise ValueError(f"{name}={path}: the file has no rows")
    if len(dataset) == 0:
        raise ValueError(f"{name}={path}: no prompt left: {dataset.filtered} prompts are longer than "
                         f"data.max_prompt_length={d.max_prompt_length} tokens")
    return dataset


def check_weights(cfg: TrainerConfig) -> None:
    """ValueError naming model.path (or trainer.reward, for a model reward) when weights are missing: no
    model.safetensors / index, or a shard the index names, or a reward model's score head (reads the index or the
    safetensors header only, not a tensor)."""
    check_weight_files(cfg.model.path, "model.path")
    kind, path = model_reward(cfg.trainer.reward) or ("", "")
    if kind:
        check_weight_files(path, f"trainer.reward={cfg.trainer.reward}")
    if kind == "model":
        from verl_mega.model_rewards.reward_model import check_reward_checkpoint

        try:
            check_reward_checkpoint(path)
        except ValueError as exc:
            raise ValueError(f"trainer.reward={cfg.trainer.reward}: {exc}") from None


def check_weight_files(path: str, key: str) -> None:
    """ValueError naming `key` when the HF directory `path` has no weights or misses a shard its index names."""
    from verl_mega.models.hf_io import weight_map

    try:
        files = sorted(set(weight_map(path).values()))
    except FileNotFoundError as exc:
        raise ValueError(f"{key}: {exc}") from None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{key}={path}: {len(missing)} of the {len(files)} weight shards its index "
                         f"names are missing, e.g. {missing[0]}")


def check_output_dir(cfg: TrainerConfig) -> None:
    """ValueError naming trainer.output_dir when it (or the first existing directory above it) is a file or not
    writable; nothing is created here."""
    existing = first_existing_dir(cfg.trainer.output_dir)
    if not os.path.isdir(existing):
        raise ValueError(f"trainer.output_dir={cfg.trainer.output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"trainer.output_dir={cfg.trainer.output_dir}: {existing} is not writable")


def newest_actor_checkpoint(cfg: TrainerConfig) -> str | None:
    """The newest complete actor checkpoint under trainer.output_dir (what trainer.resume resumes), or None."""
    from verl_mega.trainer import checkpointing

    return checkpointing.newest_actor_checkpoint(os.path.join(os.path.abspath(cfg.trainer.output_dir), "checkpoints"))


def _resumed_checkpoint(cfg: TrainerConfig) -> str | None:
    """The actor checkpoint this run would resume (trainer.resume), or None."""
    return newest_actor_checkpoint(cfg) if cfg.trainer.resume else None


def first_existing_dir(path: str) -> str:
    """The first existing path at or above `path` (absolute): where a directory for `path` would be created."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def check_resume(cfg: TrainerConfig) -> None:
    """ValueError when trainer.output_dir holds a checkpoint that the run would resume (trainer.resume) but that
    was saved from a model of other shapes than model.path (its COMPLETE marker records the model config)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.trainer.checkpoint import read_marker

    path = _resumed_checkpoint(cfg)
    recorded = read_marker(path).get("model_config") if path is not None else None
    if not recorded:
        return
    saved, ours = ModelConfig.from_hf(recorded), ModelConfig.from_hf(cfg.model.path)
    diff = [f"{f} {getattr(saved, f)} there, {getattr(ours, f)} here" for f in _SHAPE_FIELDS
            if getattr(saved, f) != getattr(ours, f)]
    if diff:
        raise ValueError(f"trainer.output_dir={cfg.trainer.output_dir} holds a checkpoint ({path}) of another model "
                         f"than model.path={cfg.model.path} ({'; '.join(diff)}), which this run would resume: use a "
                         f"new trainer.output_dir, or trainer.resume=false to start over in it")


def check_resume_data(cfg: TrainerConfig, dataset_size: int) -> None:
    """ValueError when the checkpoint this run would resume saved its data position for another dataset size
    (data.train_path's usable prompts) or trainer.seed (the shuffle order): the position would not mean the same
    prompts."""
    from verl_mega.trainer.checkpoint import read_data_state

    path = _resumed_checkpoint(cfg)
    state = read_data_state(path) if path is not None else None
    if not isinstance(state, dict) or "dataset_len" not in state:
        return
    if (state["dataset_len"], state.get("seed", cfg.trainer.seed)) != (dataset_size, cfg.trainer.seed):
        raise ValueError(f"trainer.output_dir={cfg.trainer.output_dir} holds a checkpoint ({path}) of a run over "
                         f"{state['dataset_len']} prompts with trainer.seed={state.get('seed')}, which this run "
                         f"would resume, but data.train_path={cfg.data.train_path} gives {dataset_size} usable "
                         f"prompts with trainer.seed={cfg.trainer.seed}: use the same data and seed to resume, or a "
                         f"new trainer.output_dir (or trainer.resume=false) to start over")


def check_batches(cfg: TrainerConfig, dataset_size: int, world_size: int) -> None:
    """ValueError if the dataset cannot give one batch to every data-parallel rank."""
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    need = cfg.trainer.rollout_batch_size * dp
    if dataset_size < need:
        raise ValueError(f"data.train_path={cfg.data.train_path} has {dataset_size} usable prompts, fewer than one step "
                         f"needs: trainer.rollout_batch_size={cfg.trainer.rollout_batch_size} x {dp} data-parallel "
                         f"rank(s) = {need}; lower trainer.rollout_batch_size")


def check_lengths(cfg: TrainerConfig, dataset, where: str) -> None:
    """ValueError when the dataset's longest prompt (tokens) plus the response limit (rollout.max_new_tokens;
    with tools rollout.max_total_tokens, which defaults to it) exceeds model.path's max_position_embeddings."""
    from verl_mega.models.config import ModelConfig

    limit = ModelConfig.from_hf(cfg.model.path).max_position_embeddings
    r = cfg.rollout
    key, response = (("rollout.max_total_tokens", r.max_total_tokens) if r.tools and r.max_total_tokens
                     else ("rollout.max_new_tokens", r.max_new_tokens))
    longest = max(len(item["prompt_ids"]) for item in dataset.items)
    if longest + response > limit:
        raise ValueError(f"{where}: its longest prompt ({longest} tokens, data.max_prompt_length="
                         f"{cfg.data.max_prompt_length}) + {key}={response} exceeds the max_position_embeddings="
                         f"{limit} of model.path={cfg.model.path}; lower {key} to <= {max(limit - longest, 0)} or "
                         f"data.max_prompt_length (longer prompts are dropped)")


def check_tools(cfg: TrainerConfig, tokenizer, dataset, val_dataset) -> None:
    """ValueError naming rollout.tools (or the data file and row) when the tools cannot run: no chat template in
    the model's tokenizer, a bad entry (names, arguments), a row with images, or a sandbox that does not run
    print(1) (local, or the server at its sandbox_fusion_url)."""
    from verl_mega.tools import build_tools

    if not getattr(tokenizer, "chat_template", None):  # found at the first tool call otherwise, mid-run
        raise ValueError(f"rollout.tools: the tokenizer of model.path={cfg.model.path} has no chat template; the "
                         f"agent loop appends tool results as `tool` messages through it. Use a chat model (or "
                         f"add a template to its tokenizer_config.json), or drop rollout.tools")
    tools = build_tools(cfg.rollout.tools, timeout_s=cfg.rollout.tool_timeout_s, key="rollout.tools")
    for name, data in (("data.train_path", dataset), ("data.val_path", val_dataset)):
        with_images = next((it["index"] for it in getattr(data, "items", ()) if len(it.get("image_grid_thw", ()))),
                           None)
        if with_images is not None:  # the rollout would refuse it, after the model loads
            raise ValueError(f"{name}={getattr(cfg.data, name.split('.')[1])}: row {with_images} has images, and "
                             f"multi-turn tool rollouts with images are not supported; drop rollout.tools for a "
                             f"vision-language dataset")
    asyncio.run(tools.check("rollout.tools"))


def check_model_reward(cfg: TrainerConfig) -> None:
    """ValueError naming trainer.reward when its "model:PATH" / "judge:PATH" has no tokenizer or cannot be split
    at the actor's parallel.tp (a reward model also at its pp; a judge runs on one stage)."""
    from verl_mega.models.tokenizer import load_tokenizer

    kind, path = model_reward(cfg.trainer.reward)
    what, pp = ("reward model", cfg.parallel.pp) if kind == "model" else ("judge", 1)
    if load_tokenizer(path) is None:
        raise ValueError(f"trainer.reward={cfg.trainer.reward}: {path} has no tokenizer (tokenizer.json / "
                         f"tokenizer.model); the {what} reads each prompt and response as text with its own tokenizer")
    check_fits(path, cfg.parallel.tp, pp, f"the {what} at trainer.reward={cfg.trainer.reward} (it runs at the "
               f"actor's parallel.tp{' and pp' if kind == 'model' else ''})", "trainer.reward")
    if kind == "judge":
        from verl_mega.model_rewards.judge import PARSERS, check_template

        t = cfg.trainer
        if t.judge_parse is not None and t.judge_parse not in PARSERS:
            raise ValueError(f"trainer.judge_parse={t.judge_parse!r} is not one of {sorted(PARSERS)}")
        if t.judge_template is not None:
            try:
                check_template(t.judge_template)
            except ValueError as e:
                raise ValueError(f"trainer.judge_template: {e}") from None


def check_reward(reward_fn: Callable, dataset, where: str) -> None:
    """A rule reward must have a checker for every data_source of the dataset and a ground truth for every
    row (ValueError naming the data sources, or the first row without `reward_model.ground_truth`)."""
    from verl_mega.rewards.base import RuleBasedReward

    if isinstance(reward_fn, RuleBasedReward):
        reward_fn.check_data_sources((item["data_source"] for item in dataset.items), where=where)
        missing = [item for item in dataset.items if item["ground_truth"] is None]
        if missing:
            first = missing[0]
            raise ValueError(f"{where}: row {first['index']} has no reward_model.ground_truth "
                             f"(reward_model={first['reward_model']!r:.80}; {len(missing)} of {len(dataset)} rows "
                             f"lack one); the rule reward (trainer.reward=rule) compares the response with it. Put "
                             f"the answer in reward_model.ground_truth, or pass your own reward: "
                             f"trainer.reward=module:function or trainer.reward=file.py:function")


def preflight(cfg: TrainerConfig, world_size: int) -> Prepared:
    """Run every check of the module docstring for a run of `world_size` processes; returns what they built."""
    check_launch(cfg, world_size)  # before importing the model code (megatron-core: seconds)
    check_output_dir(cfg)
    check_model(cfg)
    check_resume(cfg)
    from verl_mega.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    if tokenizer is None:
        raise ValueError(f"model.path={cfg.model.path} has no tokenizer (tokenizer.json / tokenizer.model)")
    dataset = load_dataset(cfg, tokenizer)
    check_batches(cfg, len(dataset), world_size)
    check_resume_data(cfg, len(dataset))
    check_lengths(cfg, dataset, f"data.train_path={cfg.data.train_path}")
    t = cfg.trainer
    if t.val_every and not cfg.data.val_path:
        raise ValueError(f"trainer.val_every={t.val_every} validates on data.val_path, which is not set: give the "
                         f"held-out prompts (data.val_path=FILE) or set trainer.val_every=0")
    val_dataset = (load_dataset(cfg, tokenizer, "val_path") if cfg.data.val_path and (t.val_every or t.val_before_train)
                   else None)
    if val_dataset is not None:
        check_lengths(cfg, val_dataset, f"data.val_path={cfg.data.val_path}")
    if cfg.rollout.tools:
        check_tools(cfg, tokenizer, dataset, val_dataset)
    reward_fn = load_reward(t.reward, import_timeout_s=t.reward_timeout_s)
    if reward_fn is None:
        check_model_reward(cfg)
    check_reward(reward_fn, dataset, f"data.train_path={cfg.data.train_path}")
    if val_dataset is not None:
        check_reward(reward_fn, val_dataset, f"data.val_path={cfg.data.val_path}")
    check_weights(cfg)  # last: every check above runs on a directory without weights (the tests rely on it)
    return Prepared(dataset=dataset, reward_fn=reward_fn, val_dataset=val_dataset)
