import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines import forkserver

pytestmark = pytest.mark.skipif(not forkserver.supported(), reason="needs fork and descriptor passing")
SUPPORT = str(Path(__file__).resolve().parents[1] / "support")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")]))
    fs = forkserver.ForkServer(modules=("json", "forktarget"))
    assert fs.wait_ready(60)
    yield fs
    fs.close()


def run_client(fs, **env):
    env = {**os.environ, "MBM_FORK_TARGET": "forktarget:main", **env}
    return subprocess.Popen(shlex.split(fs.command()), env=env, stdout=subprocess.PIPE, text=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone_within(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_a_forked_child_gets_the_clients_env_output_and_exit_code(server):
    proc = run_client(server, FORK_TEST_WORD="hello", FORK_TEST_CODE="3")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3
    child = int(out.split()[1])
    assert out.strip() == f"child {child} says hello"  # written by the child on the client's stdout
    assert child != proc.pid
    ok = run_client(server, FORK_TEST_WORD="again")
    assert ok.communicate(timeout=30)[0].endswith("says again\n") and ok.returncode == 0


def test_a_forked_child_collects_garbage_but_never_walks_the_preloaded_objects(server):
    """The server imports with collection off, then freezes what it imported: a child's collections
    skip those objects (and so never write to, and copy, their pages), and collect the child's own."""
    proc = run_client(server, MBM_FORK_TARGET="forktarget:gc_state")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    _, _, _, enabled, frozen = out.split()
    assert enabled == "True"
    assert int(frozen) > 1000  # the interpreter's and the preloaded modules' objects


def test_killing_the_client_ends_its_child(server):
    proc = run_client(server, FORK_TEST_SLEEP="60")
    child = int(proc.stdout.readline().split()[1])
    assert alive(child)
    proc.kill()
    proc.wait()
    assert gone_within(child)


def test_the_server_stops_with_close_and_when_its_driver_dies(tmp_path):
    fs = forkserver.ForkServer(modules=("json",))
    assert fs.wait_ready(60)
    fs.close()
    assert fs._proc.poll() is not None and not Path(fs.path).exists()
    # A driver killed with -9 cannot close it: the server notices and exits on its own.
    root = str(Path(__file__).resolve().parents[2])
    code = (f"import sys, time; sys.path.insert(0, {root!r}); from pipelines import forkserver; "
            "fs = forkserver.ForkServer(modules=('json',)); fs.wait_ready(60); print(fs._proc.pid, flush=True); "
            "time.sleep(60)")
    driver = subprocess.Popen([sys.executable, "-c", code.replace("print(fs._proc.pid", "print(fs._proc.pid, fs.path")],
                              stdout=subprocess.PIPE, text=True)
    server_pid, path = driver.stdout.readline().split()
    driver.kill()
    driver.wait()
    assert gone_within(int(server_pid))
    assert not Path(path).parent.exists()  # it removed its socket's folder on the way out


def test_a_client_started_before_the_server_is_ready_waits_for_it(monkeypatch):
    # The driver starts its workers without waiting for the server's imports.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")]))
    fs = forkserver.ForkServer(modules=("json", "forktarget", "forkslow"))
    try:
        fs.preload([])  # what the driver does, then it builds the pipeline and starts the workers
        proc = run_client(fs, FORK_TEST_WORD="early", FORK_TEST_CODE="4")  # the server has not bound its socket yet
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 4 and out.endswith("says early\n")
        assert int(out.split()[1]) != proc.pid  # forked by the server
        assert fs.wait_ready(1)  # it was ready by then
    finally:
        fs.close()


def test_a_client_whose_server_is_gone_runs_the_worker_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")]))
    fs = forkserver.ForkServer(modules=("json",))
    command = fs.command()
    fs.close()  # the server is gone before any worker connects
    env = {**os.environ, "MBM_FORK_TARGET": "forktarget:main", "FORK_TEST_WORD": "alone", "FORK_TEST_CODE": "5"}
    proc = subprocess.Popen(shlex.split(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert out.strip() == f"child {proc.pid} says alone"  # the client itself
    assert "fork server is not running" in err


def test_a_client_stops_waiting_after_the_deadline(tmp_path):
    from pipelines import forkclient

    start = time.monotonic()
    assert forkclient.connect(str(tmp_path / "never"), os.getpid(), wait=0.3) is None  # alive, never listening
    assert 0.3 <= time.monotonic() - start < 5


def test_a_temp_dir_too_long_for_a_socket_path_gives_way_to_tmp(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = forkserver._socket_dir()
    try:
        assert folder.startswith("/tmp/mbm-fork-") and len(os.path.join(folder, "sock")) <= forkserver.MAX_SOCKET_PATH
    finally:
        os.rmdir(folder)


def test_a_socket_path_that_cannot_be_used_is_no_crash_of_the_client():
    from pipelines import forkclient

    too_long = "/tmp/" + "x" * 200 + "/sock"  # connect raises OSError: it waits, then gives up (and runs the worker)
    assert forkclient.connect(too_long, os.getpid(), wait=0.2) is None


def test_a_server_that_dies_before_forking_leaves_the_worker_to_its_client(server):
    os.kill(server._proc.pid, signal.SIGSTOP)  # the client connects and sends its request, the server takes none
    proc = run_client(server, FORK_TEST_WORD="orphan", FORK_TEST_CODE="6")
    time.sleep(1.0)
    os.kill(server._proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 6 and out.strip() == f"child {proc.pid} says orphan"  # the client ran it


def test_preloading_skips_an_optional_import_for_then_only(tmp_path, monkeypatch):
    """Beam imports pandas only to register pandas batch types: the server's preload skips it (0.3 s of
    imports before any worker starts), and a module imported afterwards still gets it."""
    (tmp_path / "optional_dep.py").write_text("VALUE = 7\n")
    (tmp_path / "beamlike.py").write_text(
        "try:\n    import optional_dep\n    HAVE = True\nexcept ImportError:\n    HAVE = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("optional_dep", "beamlike"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    meta_path = list(sys.meta_path)
    forkserver._preload(["beamlike"], skip=("optional_dep",))
    assert sys.modules["beamlike"].HAVE is False and "optional_dep" not in sys.modules
    assert sys.meta_path == meta_path
    import optional_dep  # a plugin extractor's import, later: as usual

    assert optional_dep.VALUE == 7
    monkeypatch.delitem(sys.modules, "optional_dep")
    assert forkserver.OPTIONAL_FOR_BEAM == ("pandas",)


def test_a_worker_killed_by_a_signal_is_said_in_its_log_and_exit_status(server):
    """The kernel's out-of-memory killer sends SIGKILL: the client says so on its stderr (the workers'
    log) and exits 128 + 9, where it used to exit 1 without a word."""
    env = {**os.environ, "MBM_FORK_TARGET": "forktarget:killed"}
    proc = subprocess.Popen(shlex.split(server.command()), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline().split()[1])
    os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "mbm: a Beam worker process was killed by SIGKILL (on Linux usually the kernel's out-of-memory killer" in err
    assert gone_within(child)  # reaped by the server, not left a zombie
    segv = subprocess.Popen(shlex.split(server.command()), env={**env, "FORK_TEST_SIGNAL": "SIGSEGV"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = segv.communicate(timeout=30)
    assert segv.returncode == 128 + signal.SIGSEGV and "killed by SIGSEGV\n" in err
    # An ordinary exit still reports its own code, at once.
    ok = run_client(server, FORK_TEST_CODE="4")
    ok.communicate(timeout=30)
    assert ok.returncode == 4


def test_a_workers_stderr_drops_what_a_full_disk_refuses():
    import errno
    import io

    from pipelines.forkclient import LossyStream

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    stream = LossyStream(Full())
    print("Traceback (most recent call last): ...", file=stream)  # what Beam's worker does before it answers
    stream.flush()
    kept = LossyStream(io.StringIO())
    print("written", file=kept)
    assert kept.getvalue() == "written\n"
