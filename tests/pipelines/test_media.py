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


@pytest.mark.parametrize(("stored", "written"), [("NFD", "NFC"), ("NFC", "NFD")])
def test_a_name_in_the_other_unicode_normalization_form_reads_the_file(tmp_path, stored, written):
    import unicodedata

    name = "café-Ångström.png"
    try:
        (tmp_path / unicodedata.normalize(stored, name)).write_bytes(b"pixels")
    except OSError:  # a file system that normalizes names itself (macOS): nothing to find
        pytest.skip("this file system normalizes file names")
    if len(os.listdir(tmp_path)) != 1 or os.listdir(tmp_path)[0] != unicodedata.normalize(stored, name):
        pytest.skip("this file system normalizes file names")
    uri = str(tmp_path / unicodedata.normalize(written, name))
    assert read_media(Media(uri=uri, name=name)) == b"pixels"
    with pytest.raises(CleanError) as e:  # a name that is missing in both forms is still missing
        read_media(Media(uri=str(tmp_path / unicodedata.normalize(written, "naïve.png")), name="naïve.png"))
    assert e.value.reason == "file.missing"


def test_a_file_over_the_limit_is_reported_with_its_own_size(tmp_path):
    (tmp_path / "long.wav").write_bytes(b"\x01" * 5000)  # read only to one byte past the limit
    with pytest.raises(CleanError) as e:
        read_media(Media(uri=str(tmp_path / "long.wav")), max_bytes=1000)
    assert e.value.reason == "file.too_large"
    assert e.value.detail == f"{tmp_path / 'long.wav'} has 5000 bytes, limit is 1000"


def test_media_identity_names_a_settled_local_file_or_tar_member_only(tmp_path, monkeypatch):
    import pipelines.media as media

    f = tmp_path / "a.jpg"
    f.write_bytes(b"abc")
    assert media.media_identity(Media(uri=str(f))) is None  # written just now: a write in the same tick is unseen
    monkeypatch.setattr(media, "SETTLED", 0.0)
    st = os.stat(f)
    ident = media.media_identity(Media(uri=str(f)))
    assert ident == f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    assert media.media_identity(Media(uri=f"file://{f}")) != ident  # the uri as given is part of it
    member = media.media_identity(Media(uri=str(f), offset=1, size=2))
    assert member == f"{ident}\0{1}\0{2}"
    for other in (Media(data=b"abc", name="a.jpg"), Media(uri="gs://bucket/a.jpg"), Media(uri=str(tmp_path / "no")),
                  Media(uri=str(tmp_path)), Media(uri="/dev/zero")):
        assert media.media_identity(other) is None
    os.mkfifo(tmp_path / "pipe.jpg")
    assert media.media_identity(Media(uri=str(tmp_path / "pipe.jpg"))) is None


def test_a_rewrite_that_keeps_size_and_mtime_changes_the_identity(tmp_path, monkeypatch):
    """What ``cp -p`` or ``touch -d`` leaves: the same size and modification time; the status-change time moves."""
    import time

    import pipelines.media as media

    monkeypatch.setattr(media, "SETTLED", 0.0)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"abc")
    before = os.stat(f)
    ident = media.media_identity(Media(uri=str(f)))
    time.sleep(0.05)
    f.write_bytes(b"xyz")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(f)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert media.media_identity(Media(uri=str(f))) != ident


def test_a_local_file_window_reads_its_bytes_only(tmp_path):
    import io

    from pipelines.media import LocalFile, large_local_file

    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 4)
    window = LocalFile(path=str(tmp_path / "f.bin"), size=100, name="m", offset=300)
    want = (bytes(range(256)) * 4)[300:400]
    with window.open() as f:
        assert f.read() == want and f.tell() == 100 and f.read(5) == b""
        assert f.seek(-10, io.SEEK_END) == 90 and f.read() == want[90:]
        assert f.seek(5) == 5 and f.read(3) == want[5:8] and f.seek(2, io.SEEK_CUR) == 10 and f.read(1) == want[10:11]
        assert f.seek(500) == 500 and f.read() == b""
    assert window.head() == want and window.tail() == want
    member = Media(uri=str(tmp_path / "f.bin"), offset=300, size=100, name="m")
    assert large_local_file(member, 100) is None and large_local_file(member, 99) == window
    assert large_local_file(Media(uri=str(tmp_path / "f.bin")), 1023).size == 1024
    assert large_local_file(Media(data=b"x" * 2000), 10) is None and large_local_file(Media(uri="gs://b/f"), 1) is None
