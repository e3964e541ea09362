"""Ray's own lines go to a log file under --out; the terminal keeps krasr-batch's (cli/quiet.py)."""

import logging
import os

from krasr_batch.cli.quiet import log_path_for, problems_in, quiet_ray

RAY_LINES = """\
2026-11-26 15:50:01,243	WARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster.
[2026-11-26 15:50:06,235 E 8084 8368] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(ModelStage))' and ID: '68' has constructor arguments in the object store and max_restarts > 0. If the arguments go out of scope
2026-11-26 15:50:06,244	WARNING __init__.py:28 -- Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.
2026-11-26 15:50:25,535	INFO streaming_executor.py:371 -- Dataset dataset_0354 execution finished in 19.35 seconds
"""


def test_healthy_ray_lines_are_not_problems():
    assert problems_in(RAY_LINES) == []


def test_errors_and_tracebacks_are_problems():
    text = RAY_LINES + (
        "[2026-11-26 16:00:00,000 E 9000 9001] raylet.cc:100: Worker died unexpectedly\n"
        "2026-11-26 16:00:01,000\tERROR worker.py:400 -- Unhandled error (suppress with ...)\n"
        "Traceback (most recent call last):\n")
    found = problems_in(text)
    assert len(found) == 3 and "Worker died unexpectedly" in found[0] and "Unhandled error" in found[1]


def test_log_path_is_under_out_for_a_local_folder(tmp_path):
    path = log_path_for(str(tmp_path / "out"))
    assert path.startswith(str(tmp_path / "out" / "logs" / "run-")) and path.endswith(".log")
    assert not log_path_for("s3://bucket/out").startswith("s3://")


def test_descriptor_2_goes_to_the_log_and_our_lines_to_the_terminal(tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()  # the run made its output folder: the log lands in it
    with quiet_ray(str(out), verbose=False) as console:
        os.write(2, b"[2026-11-26 16:00:00,000 E 1 2] core_worker.cc:1: something broke in C++\n")
        logging.getLogger("ray.data").error("a Python-level Ray error")
        logging.getLogger("krasr_batch.pipeline").warning("placement: our own warning")
        console.stream.write("files 1/1 (0 failed, 1 committed)\n")
    err = capfd.readouterr().err
    assert "files 1/1" in err and "our own warning" in err
    assert "something broke" not in err
    log = (out / "logs").iterdir().__next__().read_text()
    assert "something broke in C++" in log and "our own warning" not in log
    assert any("something broke in C++" in p for p in console.problems)
    assert console.log_path.startswith(str(out / "logs"))
    os.write(2, b"after the block\n")  # descriptor 2 is the terminal again
    assert "after the block" in capfd.readouterr().err


PUSHED = """
import os, sys
from ray._private.worker import print_to_stdstream
from krasr_batch.cli.quiet import quiet_ray
print("before the block")
with quiet_ray(sys.argv[1], verbose=False):
    print_to_stdstream({"lines": ["Task MapWorker(MapBatches(ModelStage)).submit failed: the actor is dead"],
                        "pid": "raylet", "is_err": False}, ignore_prefix=False)
    os.write(1, b"C++ on descriptor 1\\n")
print("after the block")
"""


def test_what_ray_pushes_to_the_driver_goes_to_the_log(tmp_path):
    """The errors the raylet pushes to the driver (e.g. after a SIGTERM, "(raylet) Task ... submit failed ...
    killed by ray.kill") are printed by Ray to standard output: they go to the log too, not to the user's
    stdout (where the summary and, with `plan`, the report go). A process of its own, as the CLI is: pytest's
    capture would take Python's prints before they reach descriptor 1."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", PUSHED, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["before the block", "after the block"], r.stdout
    log = (out / "logs").iterdir().__next__().read_text()
    assert "(raylet)" in log and "Task MapWorker(MapBatches(ModelStage)).submit failed" in log
    assert "C++ on descriptor 1" in log


def test_verbose_keeps_everything_on_the_terminal(tmp_path, capfd):
    with quiet_ray(str(tmp_path / "out"), verbose=True) as console:
        os.write(2, b"ray says hello\n")
    assert "ray says hello" in capfd.readouterr().err
    assert console.log_path is None and not (tmp_path / "out").exists()


def test_a_run_refused_before_writing_leaves_out_untouched(tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the log waits until --out exists
    out = tmp_path / "never-made"
    with quiet_ray(str(out), verbose=False) as console:
        os.write(2, b"ray noise\n")
    # and leaves no temporary log behind when Ray said nothing worth reading (a refused run is common in scripts)
    assert not out.exists() and console.log_path is None
    assert not any(temp.iterdir())


def test_a_refused_run_keeps_its_log_when_ray_reported_a_problem(tmp_path):
    out = tmp_path / "never-made"
    with quiet_ray(str(out), verbose=False) as console:
        os.write(2, b"[2026-11-26 16:00:00,000 E 1 2] core_worker.cc:1: something broke in C++\n")
    assert not out.exists() and console.problems and os.path.exists(console.log_path)
    assert "something broke" in open(console.log_path).read()
    os.remove(console.log_path)
