"""`verl-mega train` as a user meets it: checks that fail before the model loads (launch, model, data rows,
rule data sources), one message and exit status 2; a reward failing on every call stops the run (status 1);
banner, resume / already-finished messages, the done line's export command; tp=2 without torchrun spawns
its own processes, and a SIGTERM to the command stops them with it."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_mega.apps import train_cli
from verl_mega.testing.tiny_hf import make_tiny_hf_model, make_tiny_tokenizer, tiny_hf_config

SMALL = ["trainer.rollout_batch_size=2", "rollout.n_samples=2", "rollout.max_new_tokens=4", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny")), hidden_size=32, num_layers=2)  # 4 heads


@pytest.fixture(scope="module")
def weightless_dir(tiny_dir, tmp_path_factory):
    """The tiny model's config and tokenizer without weights: any check that passes here ran before the
    weights were read (loading them would fail with 'no weights')."""
    import shutil

    d = tmp_path_factory.mktemp("weightless") / "m"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    return str(d)


def _rows(n: int, source: str = "gsm8k") -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{i}+1=?"}], "data_source": source,
             "reward_model": {"ground_truth": str(i + 1)}} for i in range(n)]


def _jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _config(tmp_path, model: str, data: str) -> str:
    y = tmp_path / "cfg.yaml"
    y.write_text(f"model:\n  path: {model}\ndata:\n  train_path: {data}\n")
    return str(y)


def _fails_with(capsys, argv: list[str], *fragments: str, status: int = 2) -> str:
    assert train_cli.main(argv) == status
    captured = capsys.readouterr()
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    assert "Traceback" not in captured.err and captured.err.count("error:") == 1
    return captured.err


def test_reward_module_that_hangs_at_import_is_an_error_within_the_timeout(weightless_dir, tmp_path):
    # its own process: the abandoned import thread spins until that process exits, not in the test runner
    import subprocess
    import sys

    from tests.run_python import REPO

    loop = tmp_path / "loop.py"
    loop.write_text("while True:\n    pass\n\ndef score(response):\n    return 1.0\n")
    cfg = _config(tmp_path, weightless_dir, _jsonl(tmp_path / "d.jsonl", _rows(4)))
    # 60 s: the 1 s limit plus the interpreter's and the tokenizer's start (~5 s idle); a hang raises TimeoutExpired
    proc = subprocess.run([sys.executable, "-m", "verl_mega", "train", cfg, *SMALL, f"trainer.reward={loop}:score",
                           "trainer.reward_timeout_s=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"importing {loop} did not finish within 1 s (trainer.reward_timeout_s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checks_fail_before_the_model_loads(weightless_dir, tmp_path, capsys, monkeypatch):
    good = _jsonl(tmp_path / "good.jsonl", _rows(4))
    cfg = _config(tmp_path, weightless_dir, good)

    def _fails(capsys, argv, *fragments, status=2):
        return _fails_with(capsys, [argv[0], *SMALL, *argv[1:]], *fragments, status=status)
    # the default rule reward has no checker for the data's data_source
    arith = _jsonl(tmp_path / "arith.jsonl", _rows(4, "arith"))
    _fails(capsys, [cfg, f"data.train_path={arith}"], "data_source 'arith'", "known data sources: [", "trainer.reward=")
    # the rule reward needs every row's ground truth (a misnamed field would score 0 forever)
    no_truth = _rows(4)
    no_truth[2]["reward_model"] = {"answer": "3"}
    no_truth = _jsonl(tmp_path / "no_truth.jsonl", no_truth)
    _fails(capsys, [cfg, f"data.train_path={no_truth}"], "row 2 has no reward_model.ground_truth", "{'answer': '3'}",
           "1 of 4 rows", "trainer.reward=")
    # the validation file is checked with the training file, before the model loads (val_before_train is on)
    _fails(capsys, [cfg, f"data.val_path={tmp_path / 'nope.jsonl'}"], "data.val_path", "does not exist")
    _fails(capsys, [cfg, f"data.val_path={no_truth}"], f"data.val_path={no_truth}: row 2 has no reward_model.ground_truth")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, [cfg, f"data.train_path={empty}"], f"data.train_path={empty}: the file has no rows")
    # prompt + response beyond the model's positions (the tiny model has 256)
    _fails(capsys, [cfg, "rollout.max_new_tokens=250"], f"data.train_path={good}: its longest prompt (",
           "+ rollout.max_new_tokens=250 exceeds the max_position_embeddings=256", "lower rollout.max_new_tokens to <=")
    _fails(capsys, [cfg, "trainer.reward=:score"], "trainer.reward=':score': give both the module")
    _fails(capsys, [cfg, "trainer.reward=score.py:"], "trainer.reward='score.py:': give both the module")
    # a reward file that fails to import: its error and line, no traceback
    broken = tmp_path / "broken_import.py"
    broken.write_text("import math\nraise RuntimeError('no key')\n")
    _fails(capsys, [cfg, f"trainer.reward={broken}:score"], f"cannot import {broken}: {broken}:2: RuntimeError: no key")
    (tmp_path / "typo.py").write_text("def score(r):\n  return 1.0 +\n")
    _fails(capsys, [cfg, f"trainer.reward={tmp_path / 'typo.py'}:score"], "SyntaxError: invalid syntax (typo.py, line 2)")
    _fails(capsys, [cfg, "trainer.val_every=5"], "trainer.val_every=5 validates on data.val_path, which is not set")
    # an output directory that is a file
    _fails(capsys, [cfg, f"trainer.output_dir={good}/run"], f"trainer.output_dir={good}/run: {good} is a file")
    # multimodal rows for a text model: what to change, in the CLI's terms
    with_images = _rows(4)
    with_images[0]["images"] = [{"path": "a.png"}]
    with_images = _jsonl(tmp_path / "with_images.jsonl", with_images)
    _fails(capsys, [cfg, f"data.train_path={with_images}"], "row 0 has 'images' but model.path=", "is a text model")
    # a misspelt tool argument in rollout.tools
    _fails(capsys, [cfg, "rollout.tools=[{name: code_interpreter, sandbox_fusion_url: 'http://h:1', default_timout: 10}]"],
           "rollout.tools[0] (code_interpreter):", "'default_timout'")
    # tools with a tokenizer without a chat template: it failed at the first tool call, mid-run
    import shutil

    plain = tmp_path / "no_template"
    shutil.copytree(weightless_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    with open(plain / "tokenizer_config.json") as f:
        tok_cfg = json.load(f)
    tok_cfg.pop("chat_template", None)
    with open(plain / "tokenizer_config.json", "w") as f:
        json.dump(tok_cfg, f)
    _fails(capsys, [cfg, f"model.path={plain}", "rollout.tools=[{name: code_interpreter}]"],
           f"rollout.tools: the tokenizer of model.path={plain} has no chat template")
    # each limit is named alone (was "rollout.max_turns / max_total_tokens must be >= 1 and rollout.tool_timeout_s
    # > 0, got 0 / None / 30.0")
    _fails(capsys, [cfg, "rollout.max_turns=0"], "rollout.max_turns must be >= 1, got 0")
    _fails(capsys, [cfg, "rollout.tool_timeout_s=0"], "rollout.tool_timeout_s must be > 0, got 0.0")
    # one turn with tools: the model's calls would never run (agent/tool_calls stayed 0 without a word)
    _fails(capsys, [cfg, "rollout.tools=[{name: code_interpreter, sandbox_fusion_url: 'http://h:1'}]",
                    "rollout.max_turns=1"], "rollout.max_turns=1 with rollout.tools", "set rollout.max_turns >= 2")
    # a sandbox server that is not up (nothing listens on port 9 here): one error line before the model loads
    _fails(capsys, [cfg, "rollout.tools=[{name: code_interpreter, sandbox_fusion_url: 'http://127.0.0.1:9', "
                         "client_options: {retries: 0}}]"],
           "rollout.tools[0] (code_interpreter): sandbox unavailable: http://127.0.0.1:9/run_code", "verl-mega sandbox serve")
    # a judge that cannot be split at the actor's tp: named before the spawn (it was "num_heads=3 is not divisible by
    # tensor_parallel_size=2" from the spawned ranks, after the actor loaded, without saying which model)
    judge = tmp_path / "judge3"
    tiny_hf_config("llama", hidden_size=48, num_heads=3, num_kv_heads=3).save_pretrained(judge)
    make_tiny_tokenizer(str(judge))
    _fails(capsys, [cfg, f"trainer.reward=judge:{judge}", "parallel.tp=2"],
           f"parallel.tp=2 does not fit the judge at trainer.reward=judge:{judge} (it runs at the actor's parallel.tp)",
           "choose a tp dividing num_heads=3")
    # a parquet without the prompt column names the file, the row and data.prompt_key
    no_prompt = tmp_path / "no_prompt.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "1+1", "data_source": "gsm8k"}] * 4), no_prompt)
    _fails(capsys, [cfg, f"data.train_path={no_prompt}"], str(no_prompt), "row 0", "data.prompt_key='prompt'")
    bad_row = tmp_path / "bad_row.jsonl"
    bad_row.write_text(json.dumps(_rows(1)[0]) + "\n{not json\n")
    _fails(capsys, [cfg, f"data.train_path={bad_row}"], "row 1: invalid JSON")
    _fails(capsys, [cfg, "trainer.rollout_batch_size=8"], "has 4 usable prompts", "trainer.rollout_batch_size=8")
    # layouts the model or the world cannot hold: one message naming tp x pp and how to launch
    _fails(capsys, [cfg, "parallel.tp=3"], "parallel.tp=3 does not fit", "num_heads=4 is not divisible")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(capsys, [cfg, "parallel.tp=2", "parallel.pp=2"], "needs a multiple of 4 processes", "torchrun --nproc-per-node 4")
    monkeypatch.setenv("RANK", "1")  # other ranks wait (torchrun stops them when rank 0 exits), then say it too
    monkeypatch.setattr(train_cli, "OTHER_RANKS_GRACE_S", 0.0)
    assert train_cli.main([cfg, *SMALL, "parallel.tp=2", "parallel.pp=2"]) == 2
    assert "error (rank 1): parallel.tp=2 x parallel.pp=2 needs" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    _fails(capsys, [cfg, "bogus.key=1"], "unknown config key 'bogus'")
    # every other check passed: the last one finds no weights (one line, before anything is loaded)
    _fails(capsys, [cfg, f"trainer.output_dir={tmp_path / 'run0'}"], f"model.path: no weights in {weightless_dir}")
    assert not (tmp_path / "run0").exists()
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(weightless_dir, sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    _fails(capsys, [cfg, f"model.path={sharded}"], "1 of the 1 weight shards its index names are missing",
           "model-00001-of-00002.safetensors")


def test_run_resume_finished_and_export(tiny_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "train.jsonl", _rows(4)))
    run = tmp_path / "run"
    args = [cfg, *SMALL, f"trainer.output_dir={run}"]
    val = _jsonl(tmp_path / "val.jsonl", _rows(3))
    assert train_cli.main([*args, "trainer.total_steps=1", f"data.val_path={val}",
                           "trainer.logprob_max_tokens_per_micro_batch=auto"]) == 0
    out = capsys.readouterr().out
    assert "[verl-mega] layout tp=1 pp=1 dp=1" in out and "dataset 4 prompts" in out and "algorithm grpo" in out
    # auto on CPU (no capacity to plan against): micro_batch_size (8) sequences of 512 + 4 tokens
    assert "[verl-mega] micro-batches 8 sequences (update), 4128 tokens (forward-only), packed" in out
    assert f"checkpoints in {run / 'checkpoints'}; export one with: verl-mega export {run} HF_OUT_DIR" in out
    assert "done: 1 step, last reward/mean" in out
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1] and math.isfinite(records[1]["actor/loss"])
    assert records[0]["val/num_prompts"] == records[1]["val/num_prompts"] == 3  # preflight's validation set
    records = records[1:]
    assert not {"loss", "lr", "kl", "reward_mean"} & set(records[0])  # one name per quantity
    assert list((run / "tensorboard").iterdir())

    assert train_cli.main([*args, "trainer.total_steps=1"]) == 0
    assert ("run already finished at step 1 (trainer.total_steps=1); nothing to do; raise trainer.total_steps or "
            "use a new trainer.output_dir") in capsys.readouterr().out
    assert train_cli.main([*args, "trainer.total_steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints'} at step 1" in out and "steps 1 -> 2" in out
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [0, 1, 2]
    # step 2 ended the epoch (4 prompts, 2 per step): the resumed run starts the next one (was 'yielded no batch')
    assert train_cli.main([*args, "trainer.total_steps=3"]) == 0
    assert f"resuming from {run / 'checkpoints'} at step 2" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [0, 1, 2, 3]
    # the same output_dir with other data or seed: the saved data position would mean other prompts
    five = _jsonl(tmp_path / "five.jsonl", _rows(5))
    _fails_with(capsys, [*args, "trainer.total_steps=4", f"data.train_path={five}"],
                f"holds a checkpoint ({run / 'checkpoints' / 'actor' / 'step_3'}) of a run over 4 prompts with "
                f"trainer.seed=0", f"data.train_path={five} gives 5 usable prompts with trainer.seed=0")
    _fails_with(capsys, [*args, "trainer.total_steps=4", "trainer.seed=1"], "gives 4 usable prompts with trainer.seed=1")
    # the same output_dir with another model: stopped before loading, not a shape error from the checkpoint reader
    wide = make_tiny_hf_model(str(tmp_path / "wide"), hidden_size=64, num_layers=2)
    _fails_with(capsys, [*args, "trainer.total_steps=4", f"model.path={wide}"],
                f"trainer.output_dir={run} holds a checkpoint", "hidden_size 32 there, 64 here", "trainer.resume=false")


def test_ctrl_c_says_where_the_run_resumes_and_the_rerun_logs_each_step_once(tiny_dir, tmp_path, capsys):
    # the reward presses Ctrl-C (SIGINT to this process) at its 13th call: during step 4 (4 responses a step),
    # after step 3 was logged and step 2 checkpointed (save_every=2)
    reward = tmp_path / "interrupting.py"
    reward.write_text("import itertools, os, signal\ncalls = itertools.count(1)\n"
                      "def score(response):\n    if next(calls) == 13:\n        os.kill(os.getpid(), signal.SIGINT)\n"
                      "    return 0.0\n")
    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "train.jsonl", _rows(4)))
    run = tmp_path / "run"
    argv = [cfg, *SMALL, f"trainer.reward={reward}:score", "trainer.total_steps=5", "trainer.save_every=2",
            "rollout.stream_rewards=false", f"trainer.output_dir={run}"]
    assert train_cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted; rerun the same command to resume from the newest checkpoint, " \
           f"{run / 'checkpoints' / 'actor' / 'step_2'}" in err and "Traceback" not in err
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3]
    # the rerun trains steps 3-5 again from step 2: step 3 is logged once, not twice
    assert train_cli.main(argv) == 0
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_reward_failing_every_call_stops_the_run(tiny_dir, tmp_path, capsys):
    reward = tmp_path / "broken_reward.py"
    reward.write_text("def score(response):\n    raise KeyError('answer')\n")
    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "train.jsonl", _rows(4)))
    run = tmp_path / "run"
    err = _fails_with(capsys, [cfg, *SMALL, f"trainer.reward={reward}:score", "trainer.total_steps=10",
                          "trainer.reward_fail_steps=2", f"trainer.output_dir={run}"],
                 "4/4 calls", "for 2 steps in a row", "KeyError: 'answer'", status=1)
    assert "trainer.reward_fail_steps=0" in err
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]  # stopped inside step 2


def test_tp2_without_torchrun_resumes_a_tp1_checkpoint_and_sigterm_stops_it(tiny_dir, tmp_path):
    """`verl-mega train parallel.tp=2` without torchrun starts its two ranks, resumes the checkpoint of a tp=1 run
    (saying that it reshards it) and trains; `kill PID` (or `timeout`, a scheduler) on the command stops the ranks
    too, and it says where a rerun resumes (status 143). Before, the command died at once and its two ranks went
    on training as orphans, writing checkpoints. The reward (run in the ranks) records its pid and, at a rank's 5th
    call (step 3: 2 prompts x 2 samples a step, from step 1), sends the SIGTERM to the command (its pid in a file:
    a rank's parent is the fork server on CPU)."""
    import subprocess
    import sys

    from tests.processes import kill_running, still_running

    pids = tmp_path / "pids"
    reward = tmp_path / "terminating.py"
    reward.write_text(
        "import itertools, os, signal\n"
        "calls = itertools.count(1)\n"
        "def score(response):\n"
        f"    with open({str(pids)!r}, 'a') as f:\n"
        "        f.write(f'{os.getpid()}\\n')\n"
        "    if next(calls) == 5:\n"
        "        try:  # one rank sends it (O_EXCL): a second SIGTERM would end the command at once\n"
        f"            os.close(os.open({str(pids) + '.sent'!r}, os.O_CREAT | os.O_EXCL))\n"
        f"            os.kill(int(open({str(pids) + '.command'!r}).read()), signal.SIGTERM)\n"
        "        except FileExistsError:\n"
        "            pass\n"
        "    return 0.0\n")
    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "train.jsonl", _rows(4)))
    run = tmp_path / "run"
    assert train_cli.main([cfg, *SMALL, "trainer.total_steps=1", "trainer.tensorboard=false",
                           f"trainer.output_dir={run}"]) == 0  # tp=1, in this process: checkpoint step_1
    argv = [cfg, *SMALL, "parallel.tp=2", f"trainer.reward={reward}:score", "trainer.total_steps=10000",
            "trainer.save_final=false", "rollout.stream_rewards=false", f"trainer.output_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "verl_mega", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    (tmp_path / "pids.command").write_text(str(proc.pid))
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    ranks = {int(line) for line in pids.read_text().split()}
    try:
        alive = still_running(ranks)  # SIGKILLed by the command before it exits; give /proc a moment
        assert not alive, f"ranks {alive} still running after the command exited with {proc.returncode}"
    finally:
        kill_running(ranks)
    assert proc.returncode == 143, err[-2000:]
    assert "starting 2 processes (parallel.tp=2 x parallel.pp=1, dp=1)" in out
    assert f"resuming from {run / 'checkpoints'} at step 1 (saved at tp=1 pp=1 dp=1, resharded to tp=2 pp=1 dp=1)" \
        in out, out
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert f"verl-mega train: terminated (SIGTERM); rerun the same command to resume from the newest checkpoint, " \
           f"{run / 'checkpoints' / 'actor' / 'step_1'}" in err
    assert "Traceback" not in err, err[-2000:]


def test_keep_last_sets_how_many_checkpoints_stay(tiny_dir, tmp_path):
    # three were kept, always: a run saving every 100 steps for evaluation lost all but the newest three
    import os

    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "train.jsonl", _rows(4)))
    for keep, kept in ((0, ["step_1", "step_2", "step_3", "step_4"]), (2, ["step_3", "step_4"])):
        run = tmp_path / f"run{keep}"
        assert train_cli.main([cfg, *SMALL, "trainer.total_steps=4", "trainer.save_every=1", f"trainer.keep_last={keep}",
                               "trainer.tensorboard=false", f"trainer.output_dir={run}"]) == 0
        assert sorted(os.listdir(run / "checkpoints" / "actor")) == kept


def test_model_reward_weights_are_checked_before_the_model_loads(tiny_dir, tmp_path, capsys):
    """A reward model directory without weights or tokenizer, or whose weights have no score head (a causal LM
    whose config.json names no architectures): one error line naming trainer.reward, before the actor loads (they
    were a FileNotFoundError traceback, status 1, "pass token-id lists as prompts" and 'tensor score.weight (for
    parameter value_head.weight) not found', all after the actor had loaded)."""
    import shutil

    cfg = _config(tmp_path, tiny_dir, _jsonl(tmp_path / "d.jsonl", _rows(4)))
    no_weights = tmp_path / "rm_no_weights"
    shutil.copytree(tiny_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    _fails_with(capsys, [cfg, *SMALL, f"trainer.reward=judge:{no_weights}"],
                f"trainer.reward=judge:{no_weights}: no weights in {no_weights}")
    no_tokenizer = tmp_path / "judge_no_tokenizer"  # was an error at the first reward call, after a rollout
    shutil.copytree(tiny_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    _fails_with(capsys, [cfg, *SMALL, f"trainer.reward=judge:{no_tokenizer}"],
                f"trainer.reward=judge:{no_tokenizer}: {no_tokenizer} has no tokenizer (tokenizer.json / tokenizer.model)")
    causal = tmp_path / "causal_no_arch"
    shutil.copytree(tiny_dir, causal)
    with open(causal / "config.json") as f:
        hf = json.load(f)
    del hf["architectures"]
    with open(causal / "config.json", "w") as f:
        json.dump(hf, f)
    _fails_with(capsys, [cfg, *SMALL, f"trainer.reward=model:{causal}"],
                f"trainer.reward=model:{causal}: reward model {causal} has no score head", f"trainer.reward=judge:{causal}")
    two_labels = tmp_path / "rm_two_labels"  # was found only after the actor loaded
    shutil.copytree(causal, two_labels)
    hf["architectures"], hf["id2label"] = ["LlamaForSequenceClassification"], {"0": "A", "1": "B"}
    with open(two_labels / "config.json", "w") as f:
        json.dump(hf, f)
    _fails_with(capsys, [cfg, *SMALL, f"trainer.reward=model:{two_labels}"],
                f"trainer.reward=model:{two_labels}: reward model {two_labels} has 2 labels")
    # the judge's options (trainer.judge_*): checked before the model loads, each naming its key
    _fails_with(capsys, [cfg, *SMALL, "trainer.judge_parse=yes/no"],
                "trainer.judge_parse is set but trainer.reward='rule' is not an LLM judge (trainer.reward=judge:PATH)")
    judge = f"trainer.reward=judge:{tiny_dir}"
    _fails_with(capsys, [cfg, *SMALL, judge, "trainer.judge_parse=1-5"], "trainer.judge_parse='1-5' is not one of")
    _fails_with(capsys, [cfg, *SMALL, judge, "trainer.judge_template='Rate: {answer}'"],
                "trainer.judge_template: prompt_template has unknown fields ['answer']")
    _fails_with(capsys, [cfg, *SMALL, judge, "trainer.judge_max_new_tokens=0"], "trainer.judge_max_new_tokens must be >= 1")
