"""The console script's exit (krasr_batch.cli.entry): a finished ``run`` ends the process at once with its
status; everything else exits the normal way."""

import signal
import sys
import types

import pytest

import krasr_batch.cli as cli
from krasr_batch.cli import common


class _Exited(Exception):
    def __init__(self, code):
        self.code = code


@pytest.fixture
def fake_exit(monkeypatch):
    calls = []

    def fake(code):
        calls.append(code)
        raise _Exited(code)

    monkeypatch.setattr("os._exit", fake)
    monkeypatch.setattr(common, "DONE", False)
    # whatever Ray session other tests in this process hold: none, unless a test says otherwise
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    return calls


def test_other_commands_exit_normally(monkeypatch, fake_exit):
    monkeypatch.setattr("sys.argv", ["krasr-batch", "--version"])
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 0 and fake_exit == []


@pytest.mark.parametrize("status", [0, 3])
def test_a_finished_run_ends_at_once_with_its_status(monkeypatch, fake_exit, status):
    def finished_run(**_):
        common.mark_done()
        raise SystemExit(status)

    monkeypatch.setattr(cli.main, "main", finished_run)
    with pytest.raises(_Exited):
        cli.entry()
    assert fake_exit == [status]


def test_a_run_that_stopped_early_exits_normally(monkeypatch, fake_exit):
    def failed_run(**_):
        raise SystemExit(1)  # RunFailed and friends: mark_done() never ran

    monkeypatch.setattr(cli.main, "main", failed_run)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 1 and fake_exit == []


def test_a_live_ray_session_gets_the_normal_exit(monkeypatch, fake_exit):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))

    def finished_run(**_):
        common.mark_done()
        raise SystemExit(0)

    monkeypatch.setattr(cli.main, "main", finished_run)
    with pytest.raises(SystemExit):
        cli.entry()
    assert fake_exit == []


STOP_PROBE = """
import json, os, signal, sys, time
from krasr_batch.cli.common import stopped
from krasr_batch.pipeline import Terminated
from krasr_batch.pipeline.orchestrate import _stop_on_signals

_stop_on_signals()
try:
    os.kill(os.getpid(), int(sys.argv[1]))
    time.sleep(5)  # the handler runs at the next bytecode: the sleep is cut short
    print(json.dumps(None))
except Terminated as e:
    err = stopped(e)
    print(json.dumps([e.signum, err.exit_code, err.message, stopped(KeyboardInterrupt()).exit_code]))
"""


@pytest.mark.parametrize("sig, status, says", [(signal.SIGTERM, 143, "stopped by SIGTERM;"),
                                               (signal.SIGHUP, 129, "stopped by SIGHUP (its terminal closed")])
def test_sigterm_and_sighup_stop_the_run_as_ctrl_c_does(sig, status, says):
    """Once Ray is up, SIGTERM and SIGHUP raise in the main thread (the run commits its finished files on the
    way out) and the command exits 128 + the signal. Before, SIGHUP (an ssh session dropped under a run
    started without nohup) ended the driver by its default action: no summary, finished files decoded again.
    In a process of its own: signals raised in the test process left it in a state in which a later test's
    run (test_cluster.py, a stalled run's shutdown) ended with SIGSEGV."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-c", STOP_PROBE, str(int(sig))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    signum, code, message, ctrl_c = json.loads(r.stdout.strip().splitlines()[-1])
    assert signum == sig and code == status and message.startswith(says) and "rerun the same command" in message
    assert ctrl_c == 130
