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


def test_free_ports_differ_bind_and_stay_below_the_ephemeral_range():
    low = int(processes.EPHEMERAL_RANGE.read_text().split()[0])
    ports = free_ports("127.0.0.1", 5)
    assert len(set(ports)) == 5 and all(_bindable(p) for p in ports)
    assert all(processes.LOWEST_PICKED <= p < low for p in ports), (ports, low)


def test_free_ports_take_what_the_kernel_gives_where_the_ephemeral_range_leaves_no_room(tmp_path, monkeypatch):
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(processes, "EPHEMERAL_RANGE", wide)
    ports = free_ports("127.0.0.1", 3)
    assert len(set(ports)) == 3 and all(_bindable(p) for p in ports)


def test_free_ports_with_an_offset_hold_both_ports_of_each_pair_below_the_ephemeral_range():
    low = int(processes.EPHEMERAL_RANGE.read_text().split()[0])
    ports = free_ports("127.0.0.1", 3, offset=10000)
    both = [q for p in ports for q in (p, p + 10000)]
    assert len(set(both)) == 6 and all(_bindable(q) for q in both)
    assert all(processes.LOWEST_PICKED <= q < low for q in both), (ports, low)


def test_free_ports_with_an_offset_fall_back_to_the_kernel_and_keep_the_pair_in_range(tmp_path, monkeypatch):
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(processes, "EPHEMERAL_RANGE", wide)
    ports = free_ports("127.0.0.1", 2, offset=10000)
    assert len(set(ports)) == 2 and all(p + 10000 <= 65535 and _bindable(p) and _bindable(p + 10000) for p in ports)


def test_free_ports_say_so_when_no_pair_fits(monkeypatch):
    monkeypatch.setattr(processes, "_below_ephemeral", lambda: range(0))
    with pytest.raises(Unavailable, match="found only 0 of 1 free ports with P \\+ 70000"):
        free_ports("127.0.0.1", 1, offset=70000)
