"""What every command shares: the exit statuses, and one exception type for each way a command fails.

A command that cannot go on raises one of these; click prints its message as one ``error: ...`` line on
stderr and exits with the exception's status. Exit statuses of ``run``: 0 every file ok; 3 the run
completed but some files failed (listed by cause); 2 bad usage, a bad manifest or an ``--out`` made with
other settings (nothing was started); 1 a run that could not complete; 130 interrupted (Ctrl-C); 143 stopped
by SIGTERM; 129 stopped by SIGHUP (its terminal closed).
"""

from __future__ import annotations

import signal

import click

EXIT_OK, EXIT_FAILED_RUN, EXIT_USAGE, EXIT_FILES_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
EXIT_HANGUP = 129


# set by ``run`` (mark_done) once its output is committed, Ray shut down and the summary printed: the console
# script may then end the process at once (krasr_batch.cli.entry)
DONE = False


def mark_done() -> None:
    global DONE
    DONE = True


class CommandError(click.ClickException):
    """A command stops: ``error: <message>`` on stderr (nothing when the message is empty), then ``exit_code``."""

    exit_code = EXIT_FAILED_RUN

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    def show(self, file=None) -> None:
        if self.message:
            click.echo(f"error: {self.format_message()}", err=True, file=file)


class RunFailed(CommandError):
    """Exit 1: the work could not complete (too many failed files, a lost or unreachable cluster)."""

    exit_code = EXIT_FAILED_RUN


class BadUsage(CommandError):
    """Exit 2: bad options, a bad manifest or preset, an output folder that cannot be used; nothing started."""

    exit_code = EXIT_USAGE


class FilesFailed(CommandError):
    """Exit 3: the run completed, but some files failed (the summary has listed them, so no message)."""

    exit_code = EXIT_FILES_FAILED


class Interrupted(CommandError):
    """Exit 130: stopped by the user (Ctrl-C)."""

    exit_code = EXIT_INTERRUPTED


class Terminated(CommandError):
    """Exit 143 (128 + SIGTERM): stopped by SIGTERM (a scheduler's time limit or preemption, ``kill``)."""

    exit_code = EXIT_TERMINATED


class HungUp(CommandError):
    """Exit 129 (128 + SIGHUP): stopped by SIGHUP (the terminal or ssh session it was started from closed)."""

    exit_code = EXIT_HANGUP


def stopped(e: KeyboardInterrupt) -> CommandError:
    """What a command that Ctrl-C, SIGTERM or SIGHUP stopped raises: its message and exit status."""
    from krasr_batch.pipeline.errors import Terminated as SigTerm

    if isinstance(e, SigTerm) and e.signum == signal.SIGHUP:
        return HungUp("stopped by SIGHUP (its terminal closed; nohup, tmux or screen keep a run going); "
                      "finished files are kept, rerun the same command to continue")
    if isinstance(e, SigTerm):
        return Terminated("stopped by SIGTERM; finished files are kept, rerun the same command to continue")
    return Interrupted("interrupted; finished files are kept, rerun the same command to continue")


def write_failed(e: OSError) -> CommandError:
    """What a command raises when writing its output failed (storage.WriteFailed): exit 1, with what to do."""
    return RunFailed(f"{e}. Files committed before it are kept: make room (or fix the folder) and rerun the "
                     "same command to continue.")


_BY_STATUS = {c.exit_code: c for c in (RunFailed, BadUsage, FilesFailed, Interrupted, Terminated, HungUp)}


def exit_with(code: int) -> None:
    """End the command with exit status ``code`` and no message (a run's or a submitted job's own status)."""
    if code == EXIT_OK:
        return
    error = _BY_STATUS.get(code)
    if error is None:
        raise click.exceptions.Exit(code)
    raise error()
