"""krasr-batch: transcribe Kazakh / Russian audio archives with KRASR Whisper on Ray Data, into Parquet."""

__version__ = "0.1.0"

from krasr_batch.engines import max_new_tokens_for  # noqa: E402
from krasr_batch.manifest import FileJob, ManifestError, iter_manifest  # noqa: E402
from krasr_batch.settings import DecodeOptions, ResourceOptions, RunSettings, SegmentOptions  # noqa: E402

__all__ = [
    "__version__", "DecodeOptions", "SegmentOptions", "ResourceOptions", "RunSettings", "FileJob", "ManifestError",
    "iter_manifest", "max_new_tokens_for",
]
