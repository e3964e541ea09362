"""What runs on Ray's workers: the decode-and-segment task and the model stage.

``segment_file`` (CPU tasks, ``flat_map``) turns one manifest row into its segments, each with its audio,
then one file row (``segment_index`` -1) with the file's status; it never raises for a bad file.
``ModelStage`` (the actor pool, ``map_batches``) decodes the segment rows of each batch with one model
replica and returns them as :data:`krasr_batch.schema.STAGE_SCHEMA` rows. Both are pure functions of
their input rows, testable without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from krasr_batch.audio import SAMPLE_RATE, AudioError, check_path
from krasr_batch.engines import SegmentInput, load_decoder, segment_token_limit
from krasr_batch.engines.timing import fit_to_speech
from krasr_batch.quality import compression_ratio, truncation_cause
from krasr_batch.quality import suspect as is_suspect
from krasr_batch.schema import FILE_ROW, MODEL_OUTPUT_NAMES, STAGE_SCHEMA, decoded_whole
from krasr_batch.segment import analyse, segment_audio
from krasr_batch.settings import DecodeOptions, SegmentOptions, check_language

log = logging.getLogger(__name__)

# what a file row holds in the model's columns (it has no segment to decode); None for the others
_NOT_DECODED = {"num_tokens": 0, "truncated": False, "decode_s": 0.0, "batch_size": 0}


# ---------------------------------------------------------------- stage 1: decode and segment (CPU tasks)

def _file_fields(row: dict, language: str | None) -> dict[str, Any]:
    return {
        "file_id": row["file_id"], "path": row["path"], "line": int(row["line"]), "req_language": language or "auto",
        "reference_text": row["reference_text"], "extra_json": row["extra_json"],
    }



def segment_file(row: dict, segment_options: SegmentOptions, default_language: str,
                 input_root: str | None, token_limit: str, cut_audio: bool = True) -> Iterator[dict]:
    """One manifest row in; its segments (with audio) out, then one file row (segment_index -1).

    Never raises for a bad file: the file row carries status "error" and the cause. Without ``cut_audio``
    (``plan``) the segments come without their audio, and a long file is not decoded a second time.
    """
    t0 = time.perf_counter()
    # the Whisper code (None: detect it), however the manifest or --language spelled it ("Russian", " ru ",
    # "Auto"): what the engines take, and what files.language holds (checked on the driver before any work)
    language = check_language(row["language"] or default_language, "language")
    base = _file_fields(row, language)
    # what the input's reader left out (a sidecar text not in UTF-8) comes first, then the audio's own warnings
    listed = [row["warning"]] if row.get("warning") else []
    info = {"status": "ok", "error": None, "error_kind": None, "warning": "; ".join(listed) or None,
            "duration_s": None, "speech_s": None, "num_segments": 0}
    n = 0
    try:
        check_path(row["path"], input_root)
        plan = analyse(row["path"], segment_options)
        info.update(duration_s=plan.duration_s, speech_s=plan.speech_s, num_segments=len(plan.segments),
                    warning="; ".join(listed + plan.warnings) or None)
        audios = segment_audio(plan) if cut_audio else (np.zeros(0, np.float32) for _ in plan.segments)
        for k, ((s, e), audio) in enumerate(zip(plan.segments, audios)):
            dur = plan.audio_samples(k) / SAMPLE_RATE  # the window's audio: its span less the pauses it skips
            yield {**base, **info, "segment_index": n, "start_s": s / SAMPLE_RATE, "end_s": e / SAMPLE_RATE,
                   "audio_s": dur, "stretches": _stretches(plan, k), "speech": _speech(plan, k),
                   "max_new_tokens": segment_token_limit(dur, plan.whole_file, token_limit),
                   "audio": np.ascontiguousarray(audio, np.float32).tobytes(), "segment_wall_s": 0.0}
            n += 1
        if n != len(plan.segments):
            raise AudioError("decode_mismatch", f"second decoding pass of {row['path']} gave {n} of "
                                                f"{len(plan.segments)} segments")
    except AudioError as e:
        info.update(status="error", error=str(e), error_kind=e.kind, num_segments=n)
    except Exception as e:  # noqa: BLE001 - one file must never stop the job
        log.exception("unexpected failure on %s", row["path"])
        info.update(status="error", error=f"{type(e).__name__}: {e}", error_kind="internal", num_segments=n)
    yield {**base, **info, "segment_index": FILE_ROW, "start_s": 0.0, "end_s": 0.0, "audio_s": 0.0,
           "stretches": None, "speech": None, "max_new_tokens": 0, "audio": b"",
           "segment_wall_s": time.perf_counter() - t0}


def plan_file(row: dict, segment_options: SegmentOptions, default_language: str, input_root: str | None,
              token_limit: str) -> Iterator[dict]:
    """``krasr-batch plan``: :func:`segment_file` without the model, its rows in the stage schema with the
    model's columns empty (no text), so the driver assembles and commits them as a run's."""
    empty = {name: 0.0 if name == "decode_s" else None for name in MODEL_OUTPUT_NAMES}
    for r in segment_file(row, segment_options, default_language, input_root, token_limit, cut_audio=False):
        r.pop("audio")
        r.update(empty)
        yield r


def _stretches(plan, k: int) -> str:
    """Window ``k``'s stretches of the source, in seconds, as JSON (for word times; not an output column)."""
    import json

    return json.dumps([[s / SAMPLE_RATE, e / SAMPLE_RATE] for s, e in plan.window_pieces(k)])


def _speech(plan, k: int) -> str | None:
    """The VAD's speech spans inside window ``k``, in seconds of the source, as JSON (word times are trimmed
    to them: engines.timing.fit_to_speech; not an output column)."""
    spans = plan.window_speech(k)
    return None if spans is None else json.dumps([[s / SAMPLE_RATE, e / SAMPLE_RATE] for s, e in spans])


def source_time(stretches_json: str | None, start_s: float):
    """A function from a time in a window's audio (its stretches back to back) to the source file's timeline.

    A window skips the middles of long pauses (segment.plan_windows), so a word after a skipped pause lies
    that much later in the source than its offset in the window's audio."""
    import json

    parts = json.loads(stretches_json) if stretches_json else None
    if not parts:
        return lambda t: start_s + t

    def to_source(t: float) -> float:
        offset = 0.0
        for s, e in parts:
            if t <= offset + (e - s) + 1e-9:
                return s + max(0.0, t - offset)
            offset += e - s
        return parts[-1][1]

    return to_source


# ---------------------------------------------------------------- stage 2: the model (actor pool)

class ModelStage:
    """Ray Data callable class: one model replica per actor; decodes the segment rows of each batch."""

    def __init__(self, options: DecodeOptions, device: str = "auto", threads: int | None = None):
        self.decoder = load_decoder(options, device, threads)
        # host:pid:device:engine/precision (the precision --dtype auto resolved to on this node)
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{self.decoder.device}:{self.decoder.label}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "audio"}
        cols.update({name: [_NOT_DECODED.get(name)] * n for name in MODEL_OUTPUT_NAMES})
        cols["worker"] = [self.worker] * n
        idx = [i for i in range(n) if cols["segment_index"][i] != FILE_ROW]
        if idx:
            self._decode(batch.column("audio"), cols, idx)
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in STAGE_SCHEMA}, schema=STAGE_SCHEMA)

    def _decode(self, audio: pa.ChunkedArray, cols: dict[str, list], idx: list[int]) -> None:
        """Decode rows ``idx`` and fill in their model columns (``max_new_tokens`` was set by segment_file; a
        clip its card limit cut short, which went on to the "fit" budget, gets that budget: Decoder.decode)."""
        inputs = []
        for i in idx:
            lang = cols["req_language"][i]
            # a file decoded whole keeps its card limit exactly; a window's limit is a budget (SegmentInput)
            whole = decoded_whole(cols["num_segments"][i], cols["start_s"][i], cols["end_s"][i], cols["duration_s"][i])
            inputs.append(SegmentInput(np.frombuffer(audio[i].as_py(), np.float32),
                                       None if lang == "auto" else lang, cols["max_new_tokens"][i], whole))
        for i, x, r in zip(idx, inputs, self.decoder.decode(inputs)):
            duration = len(x.audio) / SAMPLE_RATE  # the audio decoded (its span less the pauses it skips)
            to_source = source_time(cols["stretches"][i] if "stretches" in cols else None, cols["start_s"][i])
            speech = json.loads(cols["speech"][i]) if cols.get("speech") and cols["speech"][i] else None
            values = {
                "text": r.text, "language": r.language, "language_prob": r.language_prob,
                "num_tokens": r.num_tokens, "truncated": r.truncated,
                "max_new_tokens": r.max_new_tokens or cols["max_new_tokens"][i],
                "decode_s": r.decode_s, "batch_size": r.batch_size, "avg_logprob": r.avg_logprob,
                "no_speech_prob": r.no_speech_prob, "compression_ratio": compression_ratio(r.text) if r.text else 0.0,
                "suspect": is_suspect(r.text, duration, r.avg_logprob, r.no_speech_prob),
                "truncation": truncation_cause(r.text, r.truncated),
                "words": None if r.words is None else _source_words(r.words, to_source, speech),
            }
            for name, value in values.items():
                cols[name][i] = value


def _source_words(words, to_source, speech: list | None) -> list[dict]:
    """A segment's words in the source's timeline, trimmed to the VAD's speech where it is known."""
    times = [(to_source(w.start_s), to_source(w.end_s)) for w in words]
    if speech:
        times = fit_to_speech(times, [(a, b) for a, b in speech])
    return [{"word": w.word, "start_s": s, "end_s": e, "probability": w.probability}
            for w, (s, e) in zip(words, times)]


def model_stage_class(options: DecodeOptions, device: str, threads: int | None) -> type:
    """ModelStage with its settings bound into the class itself.

    The settings travel with the class definition rather than as constructor arguments in the object
    store, so Ray can always restart a killed actor (ray-project/ray#53727).
    """

    class BoundModelStage(ModelStage):
        def __init__(self) -> None:
            super().__init__(options, device, threads)

    BoundModelStage.__name__ = BoundModelStage.__qualname__ = "ModelStage"
    return BoundModelStage

