"""The launch package: the supervisor's local backend with real child processes, the thread policy, the override
filter and the CLI error wrapper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch.cli import command, user_errors
from smolcluster.launch.overrides import child_overrides
from smolcluster.launch.supervisor import Children
from smolcluster.launch.threads import thread_env, threads_each

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def wait_for(what: str, check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_the_first_child_to_fail_stops_the_rest_and_is_named(tmp_path):
    log = tmp_path / "children.log"
    with Children(log) as children:
        sleeper = children.start("sleeper", SLEEPER, ENV)
        wait_for("the sleeper's first line", lambda: log.is_file() and "[sleeper] up" in log.read_text())
        children.start("bad", [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], ENV)
        with pytest.raises(PeerError, match=r"^bad exited with code 3; stopped the others"):
            children.wait_all()
        assert sleeper.poll() is not None  # stopped by the failure, not left running
    text = (tmp_path / "children.log").read_text()
    assert "[bad] about to fail" in text  # the failed child's last lines were relayed before the error


def test_a_clean_end_returns_and_on_line_gets_every_line():
    lines = []
    with Children() as children:
        children.start("counter", [sys.executable, "-c", "for i in range(5): print(i)"], ENV, on_line=lines.append)
        children.wait_all()
        children.stop()  # joins the relay: every line is in
    assert [line.strip() for line in lines] == ["0", "1", "2", "3", "4"]


def test_sigterm_to_a_supervising_process_stops_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from smolcluster.launch.supervisor import Children
        with Children() as children:
            p = children.start("sleeper", {SLEEPER!r}, {{**__import__("os").environ}})
            Path({str(pid_file)!r}).write_text(str(p.pid))
            children.wait(until=lambda: False)
        """)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = int(wait_for("the child's pid file", lambda: pid_file.is_file() and pid_file.read_text()))
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "KeyboardInterrupt" in out  # SIGTERM unwound like Ctrl-C, through the with block
    with pytest.raises(ProcessLookupError):  # and the with block stopped (and reaped) the child
        os.kill(pid, 0)


def test_thread_policy_splits_the_cores_and_the_users_setting_wins(monkeypatch):
    assert threads_each(3, cores=8) == 2
    assert threads_each(16, cores=8) == 1
    assert threads_each(1, cores=8) == 8
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_env({}, 3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert thread_env({"OMP_NUM_THREADS": "1"}, 3) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert thread_env({}, 3) == {}  # set in this process's environment: children inherit it


def test_the_override_filter_drops_what_a_launcher_sets_and_keeps_what_a_role_takes():
    given = ["algo=syncps", "role=worker", "rank=1", "cluster.port=5555", "+run_id=x", "train.lr=0.1",
             "cluster.host=10.0.0.2", "model=gpt2-tiny", "hydra.run.dir=/tmp/x"]
    assert child_overrides(given) == ["algo=syncps", "train.lr=0.1", "cluster.host=10.0.0.2", "model=gpt2-tiny"]
    assert child_overrides(given, drop=("cluster.host=",)) == ["algo=syncps", "train.lr=0.1", "model=gpt2-tiny"]
    assert child_overrides(given, keep=("model=", "train.")) == ["train.lr=0.1", "model=gpt2-tiny"]
    assert child_overrides() == []  # not under Hydra: nothing to hand on


def test_a_user_error_is_one_line_and_exit_2_ctrl_c_is_130(capsys):
    @command
    def bad(argv):
        raise ConfigError("train.lr=-1 is invalid: give a positive number")

    @command
    def interrupted(argv):
        raise KeyboardInterrupt

    assert bad([]) == 2
    assert capsys.readouterr().err == "error: train.lr=-1 is invalid: give a positive number\n"
    assert interrupted([]) == 130
    with pytest.raises(SystemExit) as e, user_errors():
        raise PeerError("worker 1 exited with code 2")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: worker 1 exited with code 2\n"
    with pytest.raises(ZeroDivisionError), user_errors():  # a bug keeps its traceback
        raise ZeroDivisionError


def _main(cfg):
    raise ConfigError("bad")


def test_a_decorated_hydra_main_still_pickles_for_submitit():
    cloudpickle = pytest.importorskip("cloudpickle")  # what Hydra's submitit launcher pickles the main with
    main = cloudpickle.loads(cloudpickle.dumps(user_errors(interrupted="interrupted")(_main)))
    with pytest.raises(SystemExit) as e:
        main(None)
    assert e.value.code == 2
