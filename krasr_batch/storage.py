"""Local paths and object-storage URIs (``s3://``, ``gs://``) behind one small surface, via pyarrow.fs.

Credentials come from the usual environment of each process that touches storage (the driver and every Ray
worker): ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
``~/.aws``, an EC2 instance profile; ``GOOGLE_APPLICATION_CREDENTIALS`` or the VM's service account for GCS.
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points ``s3://`` at a compatible server (MinIO, moto, ...);
``AWS_REGION``/``AWS_DEFAULT_REGION`` name the region, else the bucket's own region is looked up once.

Reads are streamed: :func:`open_input_file` gives a seekable file that fetches byte ranges on demand
(through a read-ahead buffer), so decoders never need a whole copy of a recording.
"""

from __future__ import annotations

import codecs
import fcntl
import functools
import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

READ_BUFFER_BYTES = 1 << 20  # read-ahead per open remote file: one ranged GET per MiB, not one per decoder read
COPY_CHUNK_BYTES = 8 << 20

# Environment variables that say *where* object storage is (never credentials). They are forwarded to the
# Ray workers of a cluster run so that the workers resolve s3:// URIs exactly as the driver did.
LOCATION_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class WriteFailed(OSError):
    """Writing the output failed: a full disk, a quota, a read-only mount, storage refusing the credentials."""


@contextmanager
def writing(dest: str):
    """Turn an OSError raised by the block into :class:`WriteFailed` naming ``dest`` and the system's reason."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as e:
        failed = WriteFailed(f"cannot write {dest}: {os.strerror(e.errno) if e.errno else e}")
        failed.errno = e.errno
        raise failed from e


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (object storage), False for a local path."""
    return "://" in path


def printable_path(path: str) -> str:
    """A local path as UTF-8 text. A name whose bytes are not UTF-8 (an archive unpacked from cp1251 or cp866
    zips) comes from the OS with those bytes as surrogates, which no Parquet string holds: here they are
    written ``\\xNN`` (:func:`os_path` finds the file again)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def os_path(path: str) -> str:
    """The name the OS knows a local ``path`` by. :func:`printable_path` writes a name whose bytes are not
    UTF-8 (a folder unpacked from a cp1251 or cp866 zip) with those bytes as ``\\xNN``, since no Parquet string
    holds them. Where no file has that printable name and one has the bytes it stands for, this is that
    file's name as Python's os functions take it (the bytes as surrogates): such files are read and
    transcribed under their printable id and path."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    try:
        raw = codecs.escape_decode(path.encode("utf-8"))[0]
    except ValueError:
        return path
    return os.fsdecode(raw) if os.path.lexists(raw) else path


def _s3_options(bucket: str) -> dict:
    # allow_delayed_open: an object smaller than one upload part (every Parquet part, run.json) is written
    # with a single PUT when closed, instead of a multipart upload opened up front: fewer round trips
    kwargs: dict = {"allow_delayed_open": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=(rest or scheme).rstrip("/"), scheme=scheme if rest else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif not endpoint and bucket:
        # pyarrow does not follow S3's redirects to a bucket's region; ask for it once (cached below)
        try:
            kwargs["region"] = pafs.resolve_s3_region(bucket)
        except OSError as e:  # no network to AWS, no permission: let the first real request report it
            log.debug("cannot resolve the region of s3://%s: %s", bucket, e)
    return kwargs


class UnsupportedURI(ValueError):
    """A URI scheme krasr-batch cannot read."""


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    if scheme in ("s3", "s3a"):
        return pafs.S3FileSystem(**_s3_options(bucket))
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem()
    if scheme in ("http", "https"):  # read-only audio on a web server, through fsspec's HTTP filesystem
        import fsspec

        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    try:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    except ValueError as e:  # pyarrow's ArrowInvalid: no filesystem for that scheme
        raise UnsupportedURI(f"unsupported URI scheme {scheme}:// (use s3://, gs://, http(s):// or a path)") from e
    return fs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; ``s3://bucket/key`` gives ``bucket/key``."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, _, rest = path.partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme.lower() in ("http", "https"):
        return _filesystem(scheme.lower(), ""), path  # fsspec's HTTP filesystem takes whole URLs
    return _filesystem(scheme.lower(), bucket), rest


def open_input_file(path: str) -> io.BufferedReader:
    """A seekable binary file, read in ranges from object storage (buffered, never copied whole)."""
    fs, p = filesystem(path)
    return io.BufferedReader(fs.open_input_file(p), buffer_size=READ_BUFFER_BYTES)


def open_input_stream(path: str):
    """A sequential binary stream (for text such as a manifest)."""
    fs, p = filesystem(path)
    return fs.open_input_stream(p, buffer_size=READ_BUFFER_BYTES)


def upload_file(local_path: str, dest: str) -> None:
    """Stream a local file to ``dest`` (a path or URI) without reading it into memory.

    On object storage the object appears whole when the upload completes, or not at all.
    """
    fs, p = filesystem(dest)
    with open(local_path, "rb") as src, fs.open_output_stream(p) as out:
        while chunk := src.read(COPY_CHUNK_BYTES):
            out.write(chunk)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local folder or a URI prefix."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def location_env() -> dict[str, str]:
    """The object-storage location variables (``LOCATION_ENV_VARS``) set in this process."""
    return {k: os.environ[k] for k in LOCATION_ENV_VARS if os.environ.get(k)}


@contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive lock on the local file ``path`` (created, with its folder) while the block runs:
    processes that build the same thing on one node (a model conversion, a test fixture) take turns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
