import os

import pytest

from pipelines.errors import CleanError
from pipelines.media import read_media
from schemas import Media


def _reason(uri: str) -> CleanError:
    with pytest.raises(CleanError) as e:
        read_media(Media(uri=uri))
    return e.value


def test_regular_files_and_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert read_media(Media(uri=str(tmp_path / "a.bin"))) == b"abc"
    assert read_media(Media(data=b"xyz")) == b"xyz"


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would wait forever
    error = _reason(str(fifo))
    assert error.reason == "file.unreadable" and "named pipe, not a regular file" in error.detail


def test_devices_folders_missing_and_empty(tmp_path):
    assert "character device" in _reason("/dev/zero").detail
    assert _reason(str(tmp_path)).reason == "file.unreadable"
    assert _reason(str(tmp_path / "nope.jpg")).reason == "file.missing"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(str(tmp_path / "empty.jpg")).reason == "file.empty"
