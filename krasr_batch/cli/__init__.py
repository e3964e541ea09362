"""The ``krasr-batch`` command line. Thin: read options, call the library, report.

The root group is here; each command lives in its own module and is added below, so imports run one way
(this package imports its commands, the commands import ``common`` and the library, never this module):

- ``run``: transcribe a manifest (``cli/run.py``);
- ``manifest``, ``plan``: what an input holds, before any model (``cli/inputs.py``);
- ``submit``, ``status``, ``logs``: hand a run to a Ray cluster through the Jobs API (``cli/cluster.py``);
- ``eval``, ``inspect``, ``export``: read a finished run's output (``cli/output.py``).

Exit statuses and the error style are in ``cli/common.py``.
"""

from __future__ import annotations

import logging
import sys

import click

from krasr_batch import __version__
from krasr_batch.cli.cluster import logs, status, submit
from krasr_batch.cli.inputs import manifest_command, plan_command
from krasr_batch.cli.output import eval_command, export_command, inspect_command
from krasr_batch.cli.run import run


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KRASR_BATCH"})
@click.version_option(__version__, prog_name="krasr-batch")
@click.option("-v", "--verbose", count=True,
              help="More log output (-v info, -vv debug); with -v, `run` shows Ray's own messages instead of logging them under --out.")
def main(verbose: int) -> None:
    """Transcribe Kazakh / Russian audio archives with KRASR Whisper on Ray, into Parquet."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "ray", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


for _command in (run, manifest_command, plan_command, submit, status, logs, eval_command, inspect_command,
                 export_command):
    main.add_command(_command)


def entry() -> None:
    """The ``krasr-batch`` console script and ``python -m krasr_batch``: the command, then the process ends
    at once.

    ``run`` has committed its output, shut down the Ray it started and printed its summary before it
    returns, and says so (:data:`krasr_batch.cli.common.DONE`); tearing the interpreter down after that
    (torch, onnxruntime, pyarrow, Ray's modules and their atexit hooks) only made the terminal wait, 0.7 to
    0.8 s after the summary of the demo job. So after a ``run`` that says it is done, once the streams and
    log handlers are flushed, the process exits with the command's status, unless a Ray session is still up
    (a caller's own), which the normal exit shuts down. Every other command exits normally; in-process
    callers (tests, ``main(...)``) are unaffected.
    """
    import os

    from krasr_batch.cli import common

    try:
        main.main(prog_name="krasr-batch")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # a message: the normal exit prints it
            raise
    ray = sys.modules.get("ray")
    if not common.DONE or (ray is not None and getattr(ray, "is_initialized", lambda: False)()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
