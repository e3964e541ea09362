"""``python -m krasr_batch``: the same as the ``krasr-batch`` command."""

from krasr_batch.cli import entry

entry()
