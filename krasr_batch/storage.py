"""Local paths and object-storage URIs (``s3://``, ``gs://``) behind one small surface, via pyarrow.fs.

Credentials come from the usual environment (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...);
``AWS_ENDPOINT_URL`` points S3 at a compatible server (MinIO, moto, ...).
"""

from __future__ import annotations

import functools
import os

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=16)
def _filesystem(scheme_and_host: str) -> pafs.FileSystem:
    if scheme_and_host.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kwargs = {"endpoint_override": rest or scheme, "scheme": scheme if rest else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(scheme_and_host)
    return fs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, _, rest = path.partition("://")
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest


def open_input_file(path: str):
    """A seekable binary file (read in ranges from object storage, not copied whole)."""
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def open_input_stream(path: str):
    fs, p = filesystem(path)
    return fs.open_input_stream(p)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)
