"""The run, split by where its code runs.

- ``stages``: what runs on Ray's workers (the decode-and-segment task, the model stage);
- ``assemble``: the driver's assembly of finished files, the run's counts, the progress line (no Ray);
- ``watch``: the driver waiting on Ray (the batch feed, the stall watch);
- ``orchestrate``: Ray init, placement, the Ray Data graph, the commit loop, ``run.json``;
- ``plan``: ``krasr-batch plan``, the same graph without the model, and its summary;
- ``errors``: why a run stops.

Row shapes are in :mod:`krasr_batch.schema`; the output folder in :mod:`krasr_batch.output`.
"""

from krasr_batch.pipeline.assemble import RunStats
from krasr_batch.pipeline.errors import (
           ModelUnavailable,
           OutputBusy,
           RunAborted,
           RunStalled,
           SettingsMismatch,
           Terminated,
)
from krasr_batch.pipeline.orchestrate import run
from krasr_batch.pipeline.plan import PlanReport, format_plan, plan

__all__ = ["run", "plan", "PlanReport", "format_plan", "RunStats", "ModelUnavailable", "OutputBusy", "RunAborted", "RunStalled", "SettingsMismatch",
           "Terminated"]
