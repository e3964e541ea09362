"""``python -m krasr_batch.cli``: the entrypoint ``submit`` gives a job (the same as ``krasr-batch``)."""

from krasr_batch.cli import entry

entry()
