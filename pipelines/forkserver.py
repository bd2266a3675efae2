"""Beam SDK workers forked from one pre-imported process instead of started from scratch.

A local run's worker processes each import Beam, torch and transformers before doing any work:
about 4 s of CPU per worker, spent after the driver's own imports, while the second core idles.
``ForkServer`` starts one process at the beginning of a job that imports all of that (in parallel
with the driver) and then waits on a Unix socket. The command Beam runs for each worker is the small
client in ``pipelines.forkclient``: it hands its environment (Beam's control and logging addresses,
pipeline options) and its stdin/stdout/stderr to the server, which forks a child that becomes the
SDK worker. The child writes its exit status back on the connection; the client exits with it, so
Beam sees an ordinary worker process. A child killed by a signal writes nothing: the server, which
reaps its children, sends ``signal N`` instead, and the client says so in the workers' log (the
kernel's out-of-memory killer sends SIGKILL) and exits with 128 + N. The driver does not wait for
the server: clients wait for its socket (and run the worker themselves if the server is gone), so
Beam translates the pipeline and starts its workers while the server still imports.

Fork safety: the server only imports modules; it runs no torch operation (so no OpenMP pool
exists), opens no gRPC channel and starts no thread, so a forked child starts from a clean state.
Children watch their client and the server watches the driver: a killed job leaves nothing behind.

The server imports with the garbage collector off and freezes what it imported (``gc.freeze``, as
Python's documentation advises for a process that forks): a worker's collections then never walk
those ~400,000 objects, so they neither spend time on them nor write to their headers, which gives
the worker its own copy of every page they sit on. Measured with the preprocessing job's imports: one
full collection in a forked child took 0.19 s and made 64 MB of the server's pages private to it
(PSS +33 MB); with the freeze 0.001 s and 1.5 MB. The imports themselves are ~0.15 s shorter without
collections (the server ready in 2.18-2.43 s against 2.37-2.51 s, alternating starts on 2 cores).

    python -m pipelines.forkserver SOCKET DRIVER_PID MODULE[,MODULE...]
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.abc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pipelines.forkclient import ACCEPTED, SIGNALLED, run_target, running

log = logging.getLogger(__name__)

# What a worker imports before its first element: Beam's worker, torch, the pipeline's modules.
PRELOAD = (
    "apache_beam.runners.worker.sdk_worker_main",
    "mbm.extractors.beam_api",  # Beam's RunInference without its ModelManager (scipy)
    "torch",
    "pipelines.build",
    "pipelines.cleaning",
    "pipelines.extract",
    "pipelines.sink",
    "mbm.extractors.handler",
)
READY = b"ready\n"


def _watch(pid: int, then) -> None:
    """Call ``then()`` from a daemon thread once process ``pid`` is gone."""
    def loop() -> None:
        while running(pid):
            time.sleep(0.5)
        then()

    threading.Thread(target=loop, daemon=True, name=f"watch-{pid}").start()


def recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request: JSON (client pid, environment) up to the client's half-close, with its fds 0, 1, 2."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    chunks = [msg]
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    return json.loads(b"".join(chunks).decode()), list(fds)


def supported() -> bool:
    """Fork, Unix sockets and descriptor passing are available (Linux, macOS), and not turned off."""
    return (hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")
            and os.environ.get("MBM_FORKSERVER", "1") != "0")


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's SDK worker; never returns."""
    code = 1
    try:
        conn.sendall(ACCEPTED)  # the client's worker runs here now: the client no longer runs it itself
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _watch(int(request["pid"]), lambda: os._exit(1))  # the client was killed: so is its worker
        run_target(request["env"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report and exit non-zero, as a worker process would
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(f"{code}\n".encode())
        finally:
            os._exit(code)


class _Skip(importlib.abc.MetaPathFinder):
    """Makes ``import NAME`` (and its submodules) raise ImportError while installed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname}: not imported by the worker fork server")
        return None


# Imported by Beam only to register pandas batch types, which mbm's pipeline has none of: 0.3 s of the
# fork server's imports (with what pandas pulls in), on the path to the workers' start. Skipped while
# Beam imports; a worker that imports pandas later (a plugin extractor) gets it as usual.
OPTIONAL_FOR_BEAM = ("pandas",)


def _preload(names: list[str], skip: tuple[str, ...] = ()) -> None:
    finder = _Skip(tuple(n for n in skip if n not in sys.modules))
    sys.meta_path.insert(0, finder)
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module that fails here fails again, visibly, in the worker
                log.warning("forkserver: cannot preload %s", name, exc_info=True)
    finally:
        sys.meta_path.remove(finder)


def serve(path: str, driver: int, modules: list[str]) -> None:
    """Import ``modules``, then the job's own (a JSON list on stdin), signal readiness on stdout,
    then fork one worker per connection."""
    gc.disable()  # the imports make ~400,000 objects that live as long as the process: nothing to collect
    _preload(modules, skip=OPTIONAL_FOR_BEAM)
    line = sys.stdin.readline()  # the driver knows the extractors' modules once it has read the spec
    try:
        extra = json.loads(line) if line.strip() else []
    except ValueError:
        extra = []
    _preload([m for m in extra if isinstance(m, str)])
    gc.freeze()  # ... and no collection in a forked worker walks them, writing to (and so copying) their pages
    gc.enable()
    children: dict[int, socket.socket] = {}  # forked worker → the server's end of its client's connection
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    os.write(1, READY)
    server.settimeout(0.5)  # no watcher thread: a forking process stays single-threaded
    while True:
        _reap(children)
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if not running(driver):  # the driver is gone: stop serving (workers watch their clients)
                shutil.rmtree(os.path.dirname(path), ignore_errors=True)  # the socket's folder (close() is not run)
                os._exit(0)
            continue
        conn.settimeout(None)
        try:
            request, fds = recv_request(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        try:
            pid = os.fork()
        except OSError:  # no process to be had: the client, told nothing, runs its worker itself
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        if pid == 0:
            server.close()
            for other in children.values():
                other.close()
            _child(conn, request, fds)
        for fd in fds:
            os.close(fd)
        children[pid] = conn  # kept until the child is reaped: its client hears of a killing signal


def _reap(children: dict[int, socket.socket]) -> None:
    """Reap the children that have exited; tell the client of each one a signal killed which one
    (a child that exits writes its own status)."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with conn:
            if os.WIFSIGNALED(status):
                with contextlib.suppress(OSError):
                    conn.sendall(f"{SIGNALLED}{os.WTERMSIG(status)}\n".encode())


MAX_SOCKET_PATH = 100  # AF_UNIX socket paths are limited to 107 bytes on Linux, 103 on macOS


def _socket_dir() -> str:
    """A new private folder for the server's socket: in the temp dir, or in /tmp when the temp dir's
    path is too long for a socket path (a server that cannot bind leaves its workers to start alone)."""
    folder = tempfile.mkdtemp(prefix="mbm-fork-")
    if len(os.path.join(folder, "sock").encode()) <= MAX_SOCKET_PATH or not os.path.isdir("/tmp"):
        return folder
    os.rmdir(folder)
    return tempfile.mkdtemp(prefix="mbm-fork-", dir="/tmp")


class ForkServer:
    """Starts the server process; ``command(python)`` is the worker command line for Beam."""

    def __init__(self, modules: tuple[str, ...] = PRELOAD) -> None:
        self._dir = _socket_dir()
        self.path = os.path.join(self._dir, "sock")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.forkserver", self.path, str(os.getpid()), ",".join(modules)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE, env=env,
            start_new_session=True)
        self._sent = False

    def preload(self, modules: list[str]) -> None:
        """Also import ``modules`` (once, before the first worker; later calls do nothing)."""
        if self._sent:
            return
        self._sent = True
        try:
            self._proc.stdin.write((json.dumps(list(modules)) + "\n").encode())
            self._proc.stdin.close()
        except OSError:  # the server died: wait_ready says so
            pass

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Block until the server has imported its modules; False if it died or timed out."""
        import selectors

        self.preload([])
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        ok = bool(sel.select(timeout)) and self._proc.stdout.readline() == READY
        sel.close()
        return ok and self._proc.poll() is None

    def command(self) -> str:
        """The worker command line for Beam's SubprocessSDKEnvironment (usable before the server is ready)."""
        import shlex

        return f"{shlex.quote(sys.executable)} -m pipelines.forkclient {shlex.quote(self.path)} {self._proc.pid}"

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdout, self._proc.stdin):
            if stream and not stream.closed:
                stream.close()
        shutil.rmtree(self._dir, ignore_errors=True)  # the socket's folder


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), [m for m in sys.argv[3].split(",") if m])
