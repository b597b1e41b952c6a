"""Ranks started by `verl_mega.testing.multiprocess.run_distributed` (as `verl-mega train` / `demo` start theirs
without torchrun) die with the process that started them, even when it is SIGKILLed (the OOM killer, `kill -9`)
from a script that started it in the background: no orphan rank goes on training. Before, torch's parent-death
signal (SIGINT) was ignored there and the ranks ran on as orphans of init. On CPU the ranks are children of a fork
server, which must exit with the caller for them to get that signal."""

import os
import signal
import subprocess
import sys
import time

import torch

from tests.processes import kill_running, still_running
from tests.run_python import child_env
from verl_mega.testing.multiprocess import run_distributed, start_method


def test_ranks_die_when_their_parent_is_killed(tmp_path):
    rank = tmp_path / "rank.py"  # each rank: say its pid, then wait (as a rank in a long training run)
    rank.write_text(f"import os, time\nopen(os.path.join({str(tmp_path)!r}, f'ready.{{os.getpid()}}'), 'w').close()\n"
                    "time.sleep(300)\n")
    parent = subprocess.Popen(
        # SIGINT ignored, as in a command started with `&` from a script (torch's own parent-death signal for
        # spawned processes is SIGINT, which such ranks then ignore)
        [sys.executable, "-c", "import runpy, signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "from verl_mega.testing.multiprocess import run_distributed\n"
         f"run_distributed(runpy.run_path, 2, {str(rank)!r}, timeout_s=600)\n"],
        env=child_env())
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            ranks = [int(f.split(".")[1]) for f in os.listdir(tmp_path) if f.startswith("ready.")]
        assert len(ranks) == 2, f"the ranks did not start (parent exit status {parent.poll()})"
        parent.kill()  # SIGKILL: no handler, no finally in the parent runs
        parent.wait(timeout=30)
        alive = still_running(ranks)
        assert not alive, f"ranks {alive} outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        kill_running(ranks)


def test_interrupted_parent_lets_its_ranks_unwind(tmp_path):
    """Ctrl-C on the parent alone (or SIGTERM on `verl-mega train`, which it turns into one): the ranks get SIGINT and
    unwind, releasing what they hold; they were SIGKILLed, and the resource tracker then warned of "leaked
    semaphore objects" (each rank's tqdm lock; here a multiprocessing Lock)."""
    rank = tmp_path / "rank.py"
    rank.write_text("import multiprocessing, os, time\nlock = multiprocessing.Lock()\n"
                    f"open(os.path.join({str(tmp_path)!r}, f'ready.{{os.getpid()}}'), 'w').close()\ntime.sleep(300)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import runpy\nfrom verl_mega.testing.multiprocess import run_distributed\n"
         f"run_distributed(runpy.run_path, 2, {str(rank)!r}, timeout_s=600)\n"],
        env=child_env(),
        stderr=subprocess.PIPE, text=True,
        # as a terminal's Ctrl-C finds it: a test run started in the background by a script (`&`) would pass
        # SIGINT on ignored, and a parent ignoring it never hears the interrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len([f for f in os.listdir(tmp_path) if f.startswith("ready.")]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        parent.send_signal(signal.SIGINT)  # the parent only: the ranks hear of it from the parent
        _, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "KeyboardInterrupt" in err and "leaked semaphore" not in err, err[-3000:]


def _environment_probe() -> tuple:
    return os.environ.get("VERL_MEGA_TEST_SET"), os.environ.get("VERL_MEGA_TEST_UNSET"), os.environ["RANK"]


def test_ranks_see_the_callers_environment_at_the_call(monkeypatch):
    """On CPU the ranks are forks of a fork server started at the first call, with that moment's environment;
    each rank still gets the caller's environment as it is at its own call, variables removed since included."""
    if not torch.cuda.is_available():
        assert start_method({}) == "forkserver" and start_method({"TRITON_INTERPRET": "1"}) == "spawn"
    monkeypatch.setenv("VERL_MEGA_TEST_UNSET", "at the first call")
    first = run_distributed(_environment_probe, 2)
    assert first == [(None, "at the first call", "0"), (None, "at the first call", "1")], first
    monkeypatch.delenv("VERL_MEGA_TEST_UNSET")
    monkeypatch.setenv("VERL_MEGA_TEST_SET", "later")
    assert run_distributed(_environment_probe, 2) == [("later", None, "0"), ("later", None, "1")]
