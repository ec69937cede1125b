"""Ports for servers the launchers start: free, distinct, and out of the way of outbound connections."""

from __future__ import annotations

import socket

from kinema import processes
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
