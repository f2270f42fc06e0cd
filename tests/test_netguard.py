"""The guard that keeps tests off the network must itself work: refuse beyond loopback, allow loopback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from sitecustomize import NetworkAccessError


def test_loopback_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()


def test_beyond_loopback_is_refused_and_recorded(allow_network_attempt, _network_guard):
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("huggingface.co", 443)
    sock = socket.socket()
    with pytest.raises(NetworkAccessError):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed; refused before any packet leaves
    sock.close()
    assert "huggingface.co" in _network_guard.read_text()


def test_subprocesses_are_guarded_too(allow_network_attempt, _network_guard):
    code = "import socket; socket.getaddrinfo('api.mistral.ai', 443)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "test network guard" in proc.stderr
    assert "api.mistral.ai" in _network_guard.read_text()
