"""Suite-wide fixtures. ``tests/support`` goes on ``sys.path`` so tests can ``import corpus`` (importlib mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import corpus  # noqa: E402


@pytest.fixture(scope="session")
def messy_corpus(tmp_path_factory: pytest.TempPathFactory) -> corpus.Corpus:
    """The messy end-to-end corpus (60 good samples, ~35 bad inputs), built once per session."""
    return corpus.build_corpus(tmp_path_factory.mktemp("messy_corpus"))
