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
