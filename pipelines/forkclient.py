"""The worker command of a forked local run (see ``pipelines.forkserver``); imports nothing heavy.

Sends this process's environment and stdin/stdout/stderr to the fork server, then waits for the
forked worker's exit status and exits with it. SIGTERM/SIGINT end the wait; the worker notices
this process is gone and exits too.

    python -m pipelines.forkclient SOCKET
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        request = json.dumps({"pid": os.getpid(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [request], [0, 1, 2])
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(64):
            reply += chunk
    try:
        return int(reply.strip() or b"1")
    except ValueError:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
