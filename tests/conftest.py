"""Suite-wide fixtures. ``tests/support`` goes on ``sys.path`` so tests can ``import corpus`` (importlib mode)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

SUPPORT = Path(__file__).parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import corpus  # noqa: E402

_SCAN_DIR = tempfile.mkdtemp(prefix="mbm-test-scans-")


def pytest_configure(config: pytest.Config) -> None:
    # shard scans kept on disk (mbm.data.scan) go to a folder of this test run, not the user's cache; the
    # commands tests start inherit it
    os.environ["MBM_SCAN_DIR"] = _SCAN_DIR
    # Tests send Ctrl-C (SIGINT) to commands and check how they stop. A test run started in the background
    # (`&` in a script, nohup, some CI runners) has SIGINT ignored from its start, which mbm keeps, as a
    # background job should: Python's handler here, which the commands tests start get as the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SCAN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def messy_corpus(tmp_path_factory: pytest.TempPathFactory) -> corpus.Corpus:
    """The messy end-to-end corpus (60 good samples, ~35 bad inputs), built once per session."""
    return corpus.build_corpus(tmp_path_factory.mktemp("messy_corpus"))
