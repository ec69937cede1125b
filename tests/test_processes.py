"""Ports for servers the launchers start: free, distinct, and out of the way of outbound connections."""

from __future__ import annotations

import socket

import pytest

from kinema import processes
from kinema.errors import Unavailable
from kinema.processes import free_ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _taken(ports: list[int], offset: int) -> list[int]:
    """The ports `free_ports` handed out, with each one's P + offset where it asked for pairs."""
    return [q for p in ports for q in ((p, p + offset) if offset else (p,))]


@pytest.mark.parametrize("offset", [0, 10000])
def test_free_ports_differ_bind_and_stay_below_the_ephemeral_range(offset):
    low = int(processes.EPHEMERAL_RANGE.read_text().split()[0])
    taken = _taken(free_ports("127.0.0.1", 3, offset=offset), offset)
    assert len(set(taken)) == len(taken) == (6 if offset else 3) and all(_bindable(q) for q in taken)
    assert all(processes.LOWEST_PICKED <= q < low for q in taken), (taken, low)


@pytest.mark.parametrize("offset", [0, 10000])
def test_free_ports_take_what_the_kernel_gives_where_the_ephemeral_range_leaves_no_room(tmp_path, monkeypatch, offset):
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(processes, "EPHEMERAL_RANGE", wide)
    taken = _taken(free_ports("127.0.0.1", 3, offset=offset), offset)
    assert len(set(taken)) == len(taken) == (6 if offset else 3) and all(_bindable(q) for q in taken)


def test_free_ports_say_so_when_no_pair_fits(monkeypatch):
    monkeypatch.setattr(processes, "_below_ephemeral", lambda: range(0))
    with pytest.raises(Unavailable, match="found only 0 of 1 free ports with P \\+ 70000"):
        free_ports("127.0.0.1", 1, offset=70000)
