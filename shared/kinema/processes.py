"""Process-group handling shared by the launchers of real servers (tritonserver, weed, redis-server, celery).

Each launcher starts its process with `start_new_session=True`, so the process is the leader of a group of its
own; `stop_group` ends exactly that group and `group_alive` tells whether anything of it is left. The pitfall
handled here: an orphaned zombie still answers `killpg(pgid, 0)` until an init reaps it (and in a container
that init may never come), so liveness is judged from /proc, not from the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kinema.errors import Unavailable

_LOGGER = logging.getLogger(__name__)


# Ports for servers are picked below the kernel's ephemeral range: a port from `bind(0)` comes from that range, where
# any outbound connection may take it as its local port before the server binds it (Triton binds after loading its
# models, seconds later: once in CI, "Socket '127.0.0.1:37311' already in use").
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PICKED = 20000  # above the fixed ports servers default to (Triton 8000-8002, S3 9000, Redis 6379)


def _below_ephemeral() -> range:
    """The ports from LOWEST_PICKED up to the kernel's ephemeral range (empty where that range starts lower)."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(LOWEST_PICKED, low)


def free_ports(host: str, count: int, offset: int = 0) -> list[int]:
    """`count` ports free right now (held together, so they differ), below the kernel's ephemeral range where it
    leaves room, else any the kernel gives. `offset` > 0: each port P comes with P + offset free as well (below that
    range too where there is room), for a server that takes a second port at a fixed distance (SeaweedFS: gRPC at
    P + 10000). Raises `Unavailable` where no such ports are found."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    below = _below_ephemeral()
    candidates = range(below.start, below.stop - offset)
    tries = 50 * count

    def bind(port: int) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:  # taken (or already one of ours)
            s.close()
            return None
        socks.append(s)
        return s

    def pick(port: int) -> int | None:
        """`port` (0: the kernel's choice) bound, with its P + offset; the port, or None where either is taken."""
        first = bind(port)
        if first is None:
            return None
        port = first.getsockname()[1]
        if not offset or (port + offset <= 65535 and bind(port + offset) is not None):
            return port
        return None  # the first stays held until the end, so it is not picked again

    try:
        for port in [random.choice(candidates) for _ in range(tries)] if len(candidates) >= 100 * count else []:
            if len(ports) == count:
                break
            if (picked := pick(port)) is not None:
                ports.append(picked)
        for _ in range(tries):
            if len(ports) == count:
                break
            if (picked := pick(0)) is not None:
                ports.append(picked)
        if len(ports) < count:
            pairs = f" with P + {offset}" if offset else ""
            raise Unavailable(f"found only {len(ports)} of {count} free ports{pairs} on {host}")
        return ports
    finally:
        for s in socks:
            s.close()


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in process group `pgid`, as /proc lists them now."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Orphaned zombies still answer signal 0 until an init reaps them; they hold no ports or memory.
    return bool(group_members(pgid))


def kill_group(pgid: int, sig: int) -> None:
    """Send `sig` to every process of group `pgid`; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `done` until it returns True (True) or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def stop_group(proc: subprocess.Popen, name: str, timeout: float, grace: float, sig: int = signal.SIGTERM) -> None:
    """End the group that `proc` leads: `sig` to the leader alone, SIGKILL to the group after `timeout` s.

    The leader shuts its own children down on `sig`; whatever of the group outlives it by `grace` s gets
    SIGKILL. Raises `Unavailable` if a process survives that. Call it once per process: afterwards the kernel
    may hand the group id to someone else.
    """
    pgid = proc.pid  # start_new_session=True made the process the leader of its own group
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signame = signal.Signals(sig).name
        _LOGGER.warning("%s (group %d) still running %g s after %s; killing it", name, pgid, timeout, signame)
        kill_group(pgid, signal.SIGKILL)
        proc.wait(5.0)
    if not wait_until(lambda: not group_alive(pgid), grace):
        kill_group(pgid, signal.SIGKILL)
        if not wait_until(lambda: not group_alive(pgid), 5.0):
            raise Unavailable(f"processes of {name} group {pgid} survived SIGKILL")


def read_tail(path: Path | None, lines: int) -> list[str]:
    """The last `lines` lines of a log file (read from its last 64 KiB); [] if there is none."""
    if path is None or not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        return f.read().decode(errors="replace").splitlines()[-lines:]
