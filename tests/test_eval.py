"""``krasr-batch eval``: scores against jiwer, conventions for empty sides, grouping, formats, --refs.

Output folders are built by hand (Parquet parts with sink.py's schemas); no model is needed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import jiwer
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from krasr_batch.cli import main
from krasr_batch.evaluate import EditCounts, aggregate, score_pair
from krasr_batch.schema import SEGMENTS_SCHEMA, files_schema
from krasr_batch.textnorm import normalize

# ---------------------------------------------------------------- fake output folders (used by other tests too)

WITH_SUSPECT = SEGMENTS_SCHEMA
QUALITY = ("avg_logprob", "compression_ratio", "no_speech_prob", "suspect")
# segments/ as written before the quality columns existed: the signals are then computed from the text
WITHOUT_SUSPECT = pa.schema([f for f in SEGMENTS_SCHEMA if f.name not in QUALITY])


def seg(file_id: str, index: int, start: float, end: float, text: str, **kw) -> dict:
    """A segments/ row with defaults for everything but identity, timing and text."""
    row = {"file_id": file_id, "path": f"/audio/{file_id}", "segment_index": index, "start_s": start, "end_s": end,
           "text": text, "language": "kk", "max_new_tokens": 64, "num_tokens": 10, "truncated": False,
           "decode_s": 0.5, "batch_size": 1, "worker": "host:1:cpu"}
    row.update(kw)
    return row


def frow(file_id: str, text: str | None = None, ref: str | None = None, status: str = "ok", **kw) -> dict:
    """A files/ row; ``num_segments`` is filled in by :func:`write_output` when not given."""
    row = {"file_id": file_id, "path": f"/audio/{file_id}", "status": status, "error": None, "error_kind": None,
           "warning": None, "duration_s": 10.0 if status == "ok" else None, "speech_s": 8.0 if status == "ok" else None,
           "num_segments": None, "text": text if status == "ok" else None, "reference_text": ref, "language": "kazakh",
           "segment_wall_s": 0.1}
    row.update(kw)
    return row


def write_output(root: Path, files: list[dict], segments: list[dict] | None = None, run: dict | None = None,
                 extra: list[pa.Field] | None = None, segments_schema: pa.Schema = WITHOUT_SUSPECT,
                 part: str = "part-test-000000.parquet") -> Path:
    """Write one segments/ and one files/ part (and run.json when given) under root, as a run would."""
    segments = segments or []
    (root / "segments").mkdir(parents=True, exist_ok=True)
    (root / "files").mkdir(parents=True, exist_ok=True)
    files = [dict(f) for f in files]
    for f in files:
        if f["num_segments"] is None:
            f["num_segments"] = sum(1 for s in segments if s["file_id"] == f["file_id"])
    pq.write_table(pa.Table.from_pylist(segments, schema=segments_schema), root / "segments" / part)
    pq.write_table(pa.Table.from_pylist(files, schema=files_schema(extra or [])), root / "files" / part)
    if run is not None:
        (root / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return root


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


CATEGORY = [pa.field("category", pa.string())]

PAIRS = [  # (reference, hypothesis)
    ("Сәлеметсіз бе, қалыңыз қалай?", "сәлеметсіз бе қалыңыз қалай"),
    ("Бүгін ауа райы өте жақсы.", "бүгін ауа райы жақсы екен"),
    ("Добрый день, как ваши дела?", "добрый день как дела"),
    ("Мен қазір Алматыда тұрамын.", ""),
]


def _norm_lists(pairs):
    return [normalize(r) for r, _ in pairs], [normalize(h) for _, h in pairs]


# ---------------------------------------------------------------- normalisation

def test_normalize_keeps_kazakh_letters_and_drops_punctuation():
    assert normalize("ӘҒҚҢӨҰҮҺІ әғқңөұүһі") == "әғқңөұүһі әғқңөұүһі"
    assert normalize("Сәлем, әлем! «Қалайсың?» — жақсы...") == "сәлем әлем қалайсың жақсы"
    assert normalize("Привет,мир:  всё\tхорошо\n") == "привет мир всё хорошо"
    assert normalize("сөз\u200bсөз") == "сөзсөз"  # zero-width space: dropped, not a word break
    assert normalize(None) == "" and normalize("  ...  ") == ""


# ---------------------------------------------------------------- scoring

def test_pairs_match_jiwer_corpus_level():
    refs, hyps = _norm_lists(PAIRS)
    words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
    m = aggregate([score_pair(r, h) for r, h in PAIRS])
    assert m.wer == pytest.approx(words.wer)
    assert m.mer == pytest.approx(words.mer)
    assert m.wil == pytest.approx(words.wil)
    assert m.cer == pytest.approx(chars.cer)
    assert (m.substitutions, m.deletions, m.insertions) == (words.substitutions, words.deletions, words.insertions)
    assert m.files == 4


def test_corpus_level_not_mean_of_rates():
    pairs = [("a b c d e f g h i j", "a b c d e f g h i j"), ("x", "y")]
    m = aggregate([score_pair(r, h) for r, h in pairs])
    assert m.wer == pytest.approx(1 / 11)  # the mean of per-file rates would be 0.5


def test_empty_hypothesis_is_all_deletions():
    s = score_pair("бір екі үш", "")
    assert s.words == EditCounts(deletions=3)
    assert s.chars == EditCounts(deletions=len("бір екі үш"))
    m = aggregate([s])
    assert (m.wer, m.mer, m.wil, m.cer, m.hyp_ref_ratio) == (1.0, 1.0, 1.0, 1.0, 0.0)


def test_empty_reference_counts_insertions():
    for ref in ("", "  ", "?!", None):
        s = score_pair(ref, "бір екі")
        assert s.words == EditCounts(insertions=2)
        assert s.chars == EditCounts(insertions=len("бір екі"))
    both_empty = aggregate([score_pair("", "")])
    assert (both_empty.wer, both_empty.mer, both_empty.wil, both_empty.insertions) == (0.0, 0.0, 0.0, 0)
    only_insertions = aggregate([score_pair("", "бір екі")])
    assert (only_insertions.wer, only_insertions.mer, only_insertions.wil) == (2.0, 1.0, 1.0)
    # in a corpus, the empty reference's words add to the edits, not to the reference length
    mixed = aggregate([score_pair("бір екі үш", "бір екі үш"), score_pair("", "төрт")])
    assert mixed.wer == pytest.approx(1 / 3)
    assert mixed.insertions == 1


# ---------------------------------------------------------------- the command

@pytest.fixture
def out(tmp_path: Path) -> Path:
    files = [
        frow("kk1", PAIRS[0][1], PAIRS[0][0], category="kk"),
        frow("kk2", PAIRS[1][1], PAIRS[1][0], category="kk"),
        frow("ru1", PAIRS[2][1], PAIRS[2][0], category="ru"),
        frow("bad", ref=PAIRS[3][0], status="error", error="bad: undecodable", error_kind="undecodable", category="kk"),
        frow("noref", "бір екі", None, category="ru"),
    ]
    segments = [seg("kk1", 0, 0.0, 4.0, PAIRS[0][1]), seg("kk2", 0, 0.0, 5.0, PAIRS[1][1]),
                seg("ru1", 0, 0.0, 3.0, PAIRS[2][1]), seg("noref", 0, 0.0, 2.0, "бір екі")]
    return write_output(tmp_path / "out", files, segments, extra=CATEGORY)


def test_eval_json_matches_jiwer_and_groups(out: Path):
    r = invoke("eval", str(out), "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {"overall", "groups"}
    keys = {"wer", "cer", "mer", "wil", "substitutions", "deletions", "insertions", "hyp_ref_ratio",
            "hallucination_like", "files"}
    assert set(data["overall"]) == keys
    assert set(data["groups"]) == {"kk", "ru"}
    assert all(set(g) == keys for g in data["groups"].values())
    refs, hyps = _norm_lists(PAIRS)  # the failed file is scored as an empty hypothesis
    assert data["overall"]["wer"] == pytest.approx(jiwer.process_words(refs, hyps).wer)
    assert data["overall"]["cer"] == pytest.approx(jiwer.process_characters(refs, hyps).cer)
    assert data["overall"]["files"] == 4
    kk = [0, 1, 3]
    kk_words = jiwer.process_words([refs[i] for i in kk], [hyps[i] for i in kk])
    assert data["groups"]["kk"]["wer"] == pytest.approx(kk_words.wer)
    assert data["groups"]["kk"]["deletions"] == kk_words.deletions
    assert data["groups"]["ru"]["files"] == 1  # noref is skipped
    assert data["overall"]["hallucination_like"] == 0
    assert "skipped 1" in r.stderr


def test_eval_table_and_csv(out: Path):
    table = invoke("eval", str(out))
    assert table.exit_code == 0
    assert "by category" in table.stdout and "overall" in table.stdout and "skipped 1" in table.stdout
    lines = table.stdout.splitlines()
    assert any(line.startswith("kk") for line in lines) and any(line.startswith("ru") for line in lines)

    r = invoke("eval", str(out), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(row["scope"], row["group"]) for row in rows] == [("overall", ""), ("category", "kk"), ("category", "ru")]
    data = json.loads(invoke("eval", str(out), "--format", "json").stdout)
    assert float(rows[0]["wer"]) == pytest.approx(data["overall"]["wer"])
    assert int(rows[1]["files"]) == data["groups"]["kk"]["files"] == 3


def test_eval_by_options(out: Path):
    assert json.loads(invoke("eval", str(out), "--format", "json", "--by", "none").stdout)["groups"] == {}
    by_status = json.loads(invoke("eval", str(out), "--format", "json", "--by", "status").stdout)
    assert set(by_status["groups"]) == {"ok", "error"}
    assert by_status["groups"]["error"]["wer"] == 1.0
    r = invoke("eval", str(out), "--by", "nope")
    assert r.exit_code == 2 and "nope" in r.output


def test_eval_without_category_column_does_not_group(tmp_path: Path):
    out = write_output(tmp_path / "o", [frow("a", "бір екі", "бір екі үш")], [seg("a", 0, 0.0, 2.0, "бір екі")])
    data = json.loads(invoke("eval", str(out), "--format", "json").stdout)
    assert data["groups"] == {}
    assert data["overall"]["deletions"] == 1 and data["overall"]["hyp_ref_ratio"] == pytest.approx(2 / 3)


def test_eval_refs_manifest(out: Path, tmp_path: Path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "kk1", "path": "x.wav", "text": "сәлеметсіз бе қалыңыз қалай"},  # exact: no errors
        {"path": "noref", "text": "бір екі үш"},  # id defaults to path
        {"id": "ghost", "path": "g.wav", "text": "жоқ"},
        {"id": "ru1", "path": "r.wav"},  # no text: skipped
    ]) + "\n", encoding="utf-8")
    r = invoke("eval", str(out), "--refs", str(refs), "--format", "json", "--by", "none")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["overall"]["files"] == 2
    assert data["overall"]["wer"] == pytest.approx(1 / 7)  # one deletion over 4 + 3 reference words
    assert "1 references have no file" in r.stderr and "skipped 3" in r.stderr
    marked = tmp_path / "refs-bom.jsonl"  # opened with a byte-order mark (PowerShell 5's UTF8): the same figures
    marked.write_bytes(b"\xef\xbb\xbf" + refs.read_bytes())
    again = invoke("eval", str(out), "--refs", str(marked), "--format", "json", "--by", "none")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == data

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n', encoding="utf-8")
    r = invoke("eval", str(out), "--refs", str(bad))
    assert r.exit_code == 2 and "line 1" in r.output
    bad.write_bytes(refs.read_bytes() + '{"id": "ru1", "text": "Ж"}\n'.encode("cp1251"))  # a Windows-1251 line
    r = invoke("eval", str(out), "--refs", str(bad))
    assert r.exit_code == 2 and f"{bad}, line 5: not UTF-8 text" in r.output, r.output


def test_eval_hallucination_like_computed_and_from_column(tmp_path: Path):
    loop = "рахмет рахмет рахмет рахмет рахмет"
    files = [frow("a", loop, "рахмет"), frow("b", "жақсы", "жақсы"), frow("c", "иә", "иә")]
    segments = [seg("a", 0, 0.0, 3.0, loop), seg("b", 0, 0.0, 1.0, "жақсы"), seg("c", 0, 0.0, 1.0, "иә")]
    computed = write_output(tmp_path / "computed", files, segments)
    assert json.loads(invoke("eval", str(computed), "--format", "json").stdout)["overall"]["hallucination_like"] == 1

    flagged = [dict(s, suspect=s["file_id"] in ("b", "c")) for s in segments]  # the column wins over the text
    column = write_output(tmp_path / "column", files, flagged, segments_schema=WITH_SUSPECT)
    assert json.loads(invoke("eval", str(column), "--format", "json").stdout)["overall"]["hallucination_like"] == 2


def test_eval_missing_or_empty_out_dir(tmp_path: Path):
    r = invoke("eval", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty" / "files").mkdir(parents=True)
    r = invoke("eval", str(tmp_path / "empty"))
    assert r.exit_code == 2 and "no files/part-" in r.output
