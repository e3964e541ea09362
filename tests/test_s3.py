"""A whole run on object storage: manifest, audio and --out on S3 (moto's server on 127.0.0.1).

Reads the result back from S3 with pyarrow and queries it with DuckDB (DuckDB's httpfs extension cannot be
installed offline, so DuckDB reads the Arrow table): every manifest line exactly once, nothing hidden left.
"""

from __future__ import annotations

import json

import duckdb
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from .conftest import free_port, read_jsonl, run_cli

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.e2e  # Ray runs in subprocesses

BUCKET = "krasr-test"
CLIPS = ["ru_000", "ru_001", "ru_002", "ru_003"]  # wav, flac, ogg, mp3: soundfile and PyAV over ranged reads


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on a free local port; yields (env for krasr-batch, boto3 client, pyarrow filesystem)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1")
        yield env, client, fs
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3_run(s3, corpus, tiny_model):
    """Upload a manifest (relative paths, one missing object) and its audio; run krasr-batch on S3."""
    env, client, _ = s3
    by_id = {r["id"]: r for r in read_jsonl(corpus / "clips.jsonl") + read_jsonl(corpus / "long.jsonl")}
    rows = [by_id[i] for i in [*CLIPS, "long_00"]]
    for r in rows:
        client.upload_file(str(corpus / r["path"]), BUCKET, f"in/{r['path']}")
    rows.append({"id": "missing", "path": "clips/missing.wav", "category": "bad"})
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    client.put_object(Bucket=BUCKET, Key="in/manifest.jsonl", Body=body.encode())
    args = ["run", f"s3://{BUCKET}/in/manifest.jsonl", "--out", f"s3://{BUCKET}/out", "--model", str(tiny_model),
            "--num-cpus", "2", "--no-progress"]
    return rows, args, run_cli(args, env=env, timeout=600)


def test_run_on_s3_commits_every_line_once(s3, s3_run):
    _, client, fs = s3
    rows, _, r = s3_run
    assert r.returncode == 3, r.stderr[-3000:]  # completed; the missing object is a failed file
    assert f"{len(rows)} files in the manifest" in r.stdout and "Traceback" not in r.stderr
    keys = _keys(client, "out/")
    assert "out/_SUCCESS" in keys and "out/run.json" in keys
    assert not [k for k in keys if "/.tmp-" in k], keys

    files = pads.dataset(f"{BUCKET}/out/files", filesystem=fs, format="parquet").to_table()
    segments = pads.dataset(f"{BUCKET}/out/segments", filesystem=fs, format="parquet").to_table()
    con = duckdb.connect()
    con.register("files", files)
    con.register("segments", segments)
    assert con.execute("select count(*), count(distinct file_id) from files").fetchall() == [(len(rows), len(rows))]
    assert sorted(x for (x,) in con.execute("select file_id from files").fetchall()) == sorted(r["id"] for r in rows)
    ok = dict(con.execute("select file_id, status from files").fetchall())
    assert all(ok[i] == "ok" for i in [*CLIPS, "long_00"]) and ok["missing"] == "error"
    assert con.execute("select error_kind from files where file_id = 'missing'").fetchall() == [("not_found",)]
    assert con.execute("select path from files where file_id = 'ru_000'").fetchall() == [
        (f"s3://{BUCKET}/in/clips/ru_000.wav",)]  # relative to the manifest's folder on S3
    # every ok file's segments are all there, once; the long recording was read in ranges, not whole
    per_file = con.execute("""
        select f.file_id, f.num_segments, count(s.file_id), count(distinct s.segment_index), max(s.end_s), f.duration_s
        from files f left join segments s using (file_id) where f.status = 'ok'
        group by f.file_id, f.num_segments, f.duration_s""").fetchall()
    for fid, n, got, distinct, end, dur in per_file:
        assert n >= 1 and got == distinct == n, fid
        assert end <= dur + 1e-6
    long_row = [p for p in per_file if p[0] == "long_00"][0]
    assert long_row[1] >= 4 and long_row[5] > 180  # several windows (long pauses shortened inside each)
    assert json.loads(client.get_object(Bucket=BUCKET, Key="out/run.json")["Body"].read())["counts"]["files"] == len(rows)


def test_rerun_on_s3_cleans_leftovers_and_adds_nothing(s3, s3_run):
    env, client, _ = s3
    rows, args, first = s3_run
    assert first.returncode == 3
    before = _keys(client, "out/files/")
    # what a killed run leaves: a hidden temporary object and a segments part without its files twin
    client.put_object(Bucket=BUCKET, Key="out/files/.tmp-part-dead-000000.parquet.0a1b2c3d", Body=b"PAR1")
    client.copy_object(Bucket=BUCKET, Key="out/segments/part-dead-000000.parquet",
                       CopySource={"Bucket": BUCKET, "Key": _keys(client, "out/segments/part-")[0]})
    r = run_cli(args, env=env, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"{len(rows)} already done by an earlier run" in r.stdout
    keys = _keys(client, "out/")
    assert not [k for k in keys if "/.tmp-" in k or "part-dead" in k], keys
    assert _keys(client, "out/files/") == before
