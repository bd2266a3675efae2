"""The worker command of a forked local run (see ``pipelines.forkserver``); imports nothing heavy.

Sends this process's environment and stdin/stdout/stderr to the fork server, then waits for the
forked worker's exit status and exits with it; a worker killed by a signal (SIGKILL from the kernel's
out-of-memory killer) is said in the workers' log (``killed_line``) and exits 128 + N. SIGTERM/SIGINT
end the wait; the worker notices this process is gone and exits too.

The driver starts its workers without waiting for the server to finish its imports (it builds and
translates the pipeline meanwhile), so the client waits for the server's socket. If the server
exits first, is not listening within ``WAIT`` seconds, or dies before the child it forks for this
client answers ``accepted``, the client becomes the worker itself, as an ordinary worker process would
(slower to start, same result) and says so on stderr.

    python -m pipelines.forkclient SOCKET SERVER_PID
    python -m pipelines.forkclient          (no server: this process is the worker)

Either way the worker's stderr, the workers' log in the output folder, drops what it cannot write
(``LossyStream``): Beam's worker prints a failed bundle's traceback to stderr before it sends the
runner the error, and on a full disk that print raised, the error was never sent, and the runner
waited for it forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping

WAIT = 120.0  # seconds the server may take to import its modules
DEFAULT_TARGET = "apache_beam.runners.worker.sdk_worker_main:main"  # as pipelines.forkserver forks
ACCEPTED = b"accepted\n"  # first line from the forked child: it runs this client's worker
SIGNALLED = "signal "  # from the server, for a forked child that a signal killed: "signal N"
KILLED = "mbm: a Beam worker process was killed by "  # the start of the line that says so in the workers' log


def killed_line(signum: int) -> str:
    """The workers'-log line for a worker that signal ``signum`` killed."""
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    why = " (on Linux usually the kernel's out-of-memory killer: the machine ran out of memory)" \
        if signum == signal.SIGKILL else ""
    return f"{KILLED}{name}{why}\n"


def running(pid: int) -> bool:
    """Process ``pid`` exists and has not exited (a zombie, not yet reaped by the driver, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill's answer stands


def connect(path: str, server: int, wait: float = WAIT) -> socket.socket | None:
    """A connection to the server at ``path``, once it listens; None if it exits or ``wait`` runs out."""
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except OSError:  # not bound or not listening yet; or a path it cannot bind (it exits then)
            conn.close()
        if not running(server) or time.monotonic() > deadline:
            return None
        time.sleep(0.02)


class LossyStream:
    """A text stream that drops what it cannot write (an OSError: the disk is full, the pipe is gone)
    instead of raising; everything else is the wrapped stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run_target(env: Mapping[str, str]) -> None:
    """Run the worker: ``MBM_FORK_TARGET`` (``module:function``) of ``env``, Beam's SDK worker by default,
    with a stderr that cannot fail it (``LossyStream``)."""
    import importlib

    if not isinstance(sys.stderr, LossyStream):
        sys.stderr = LossyStream(sys.stderr)
    module, _, func = env.get("MBM_FORK_TARGET", DEFAULT_TARGET).partition(":")
    getattr(importlib.import_module(module), func)([sys.argv[0]])


def run_here(say: bool = True) -> int:
    """Be the worker in this process, without the server (``say``: note that in the workers' log)."""
    if say:  # one write, not print's two: the workers share the log
        sys.stderr.write("mbm: the worker fork server is not running; starting this worker the usual way\n")
        sys.stderr.flush()
    try:
        run_target(os.environ)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def main(path: str, server: int) -> int:
    conn = connect(path, server)
    if conn is None:
        return run_here()
    reply = b""
    # A reset means the server died: what it said until then tells whether a worker was forked. The
    # worker's status is one line after ACCEPTED: its exit code from the worker itself, or "signal N"
    # from the server once a signal killed it.
    with conn, contextlib.suppress(OSError):
        request = json.dumps({"pid": os.getpid(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [request], [0, 1, 2])
        conn.shutdown(socket.SHUT_WR)
        while chunk := conn.recv(64):
            reply += chunk
            if reply.startswith(ACCEPTED) and reply.endswith(b"\n") and reply.count(b"\n") >= 2:
                break
    if not reply.startswith(ACCEPTED):  # the server died before taking this worker on
        return run_here()
    status = reply[len(ACCEPTED):].decode(errors="replace").strip()
    if status.startswith(SIGNALLED) and status[len(SIGNALLED):].isdigit():
        signum = int(status[len(SIGNALLED):])
        sys.stderr.write(killed_line(signum))  # one write: the workers share the log
        sys.stderr.flush()
        return 128 + signum
    try:
        return int(status or "1")  # nothing: the worker and the server died without a word
    except ValueError:
        return 1


if __name__ == "__main__":
    sys.stderr = LossyStream(sys.stderr)  # the workers' log: a full disk under it must not stop this process
    sys.exit(main(sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 1 else run_here(say=False))
