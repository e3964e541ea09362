"""Parity with the model card's usage on the real whisper-base weights (slow: about 4 minutes on 2 CPUs)."""

import jiwer
import pyarrow.dataset as pads
import pytest

from benchmarks.baselines import card_usage
from krasr_batch.textnorm import normalize

from .conftest import read_jsonl, run_cli, write_manifest


@pytest.mark.slow
def test_same_text_as_the_card_pipeline(tmp_path, corpus, base_model):
    clips = read_jsonl(corpus / "clips.jsonl")
    manifest = write_manifest(tmp_path / "clips.jsonl", clips, base=corpus)
    r = run_cli(["run", str(manifest), "--out", str(tmp_path / "out"), "--model", str(base_model), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    ours = {f["file_id"]: f["text"] for f in pads.dataset(tmp_path / "out" / "files").to_table().to_pylist()}
    items = [{"id": c["id"], "path": str(corpus / c["path"]), "language": c["language"]} for c in clips]
    card, _ = card_usage(items, str(base_model))
    same = [t.file_id for t in card if t.text == ours[t.file_id]]
    assert len(same) >= 0.9 * len(clips), [(t.text, ours[t.file_id]) for t in card if t.file_id not in same]
    refs = [normalize(c["text"]) for c in clips]
    wer_card = jiwer.wer(refs, [normalize(t.text) for t in card])
    wer_ours = jiwer.wer(refs, [normalize(ours[c["id"]]) for c in clips])
    assert abs(wer_ours - wer_card) <= 0.01, (wer_ours, wer_card)
