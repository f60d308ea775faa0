"""A loopback-only network namespace for tests that run Ray (TESTING.md, "Ray on one machine").

Ray advertises the host's address and listens on every interface; inside a private network
namespace with only ``lo`` up it uses 127.0.0.1 and nothing leaves the machine. The namespace
is held open by a sleeping process; programs enter it with ``nsenter --net=/proc/PID/ns/net``.

The test process stays outside (its other servers, its clients); ``forward`` lets it reach a
port inside through an inherited listening socket: the forwarder runs inside the namespace
but accepts on a socket that was bound on the host's 127.0.0.1 before it entered.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FORWARDER = Path(__file__).resolve().parent / "netns_forward.py"


def stop_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` s (never ``ray stop``,
    which would end every Ray process on the machine)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class LoopbackNamespace:
    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sleep", "infinity"], start_new_session=True
        )
        self.path = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 10
        # unshare has entered the namespace once the holder's link differs from ours.
        while os.readlink(self.path) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline or self.holder.poll() is not None:
                raise RuntimeError("unshare -n did not start (it needs root)")
            time.sleep(0.02)
        subprocess.run(self.command(["ip", "link", "set", "lo", "up"]), check=True)
        self.children: list[subprocess.Popen[Any]] = []

    def command(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", *argv]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """A process group of its own inside the namespace, stopped with the namespace."""
        proc = subprocess.Popen(self.command(argv), start_new_session=True, **kwargs)
        self.children.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(argv), **kwargs)

    def forward(self, inner_port: int) -> int:
        """A port on the host's 127.0.0.1 that reaches ``inner_port`` inside the namespace."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = int(listener.getsockname()[1])
        self.popen([sys.executable, str(FORWARDER), str(listener.fileno()), str(inner_port)],
                   pass_fds=[listener.fileno()])  # fmt: skip
        listener.close()  # the forwarder holds it now
        return port

    def close(self) -> None:
        for proc in reversed(self.children):
            stop_group(proc)
        stop_group(self.holder, grace=1)
