"""Why a run stops: the exceptions the pipeline raises and the CLI turns into exit statuses."""

import signal

from krasr_batch.output.claim import OutputBusy  # noqa: F401  (raised by run and plan, from the output claim)


class SettingsMismatch(RuntimeError):
    """``--out`` holds output made with other model or decoding settings."""


class ModelUnavailable(RuntimeError):
    """--model cannot be loaded (or converted) here."""


class RunAborted(RuntimeError):
    """The run cannot complete (too many failures, a lost cluster, files missing at the end)."""


class RunStalled(RunAborted):
    """Nothing came back for ``--stall-timeout`` while Ray held requests that no node could place."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption or time limit, ``kill``, ``docker stop``) or SIGHUP (the terminal or
    ssh session the run was started from closed) reached the run: it stops as Ctrl-C stops it, keeping every
    finished file. ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum
