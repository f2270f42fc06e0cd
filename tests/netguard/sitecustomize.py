"""Test-only network guard: any connection or name lookup beyond loopback is refused and recorded.

conftest.py installs it in the test process and puts this folder on PYTHONPATH, so every Python subprocess a test
starts (the CLI, a fresh venv) loads it too, as sitecustomize. Violations are appended to the file named by
POCKETVLM_NETGUARD_LOG; the test that caused one fails, even if the code under test swallowed the error.
"""

import ipaddress
import os
import socket

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NetworkAccessError(ConnectionRefusedError):
    pass


def _is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    if host in _LOOPBACK_NAMES or host == "":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, target) -> None:
    log = os.environ.get("POCKETVLM_NETGUARD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what} {target!r}\n")
    raise NetworkAccessError(f"test network guard: {what} to {target!r} refused (only loopback is allowed)")


def install() -> None:
    if getattr(socket, "_pocketvlm_guarded", False):
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def _check(sock, address, what):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse(what, address)

    def connect(self, address):
        _check(self, address, "connect")
        return real_connect(self, address)

    def connect_ex(self, address):
        _check(self, address, "connect")
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            _refuse("name lookup", host)
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket._pocketvlm_guarded = True


if os.environ.get("POCKETVLM_NETGUARD_LOG"):
    install()
