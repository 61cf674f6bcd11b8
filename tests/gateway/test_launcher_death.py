"""`pagewire serve` killed outright (SIGKILL: no chance to stop its
children) still takes its three services with it, and their ports are free
for the next start."""

from __future__ import annotations

import socket
import sys

import psutil
import pytest

from tests.support.harness import LOOPBACK, ServeProcess

EXIT_TIMEOUT_S = 15.0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # A listener still holding the port fails the bind; a connection in TIME_WAIT does not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_services_of_a_killed_launcher_exit_and_free_their_ports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    serve = ServeProcess(["--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "32"], log_path=tmp_path / "serve.log")
    with serve.running():
        children = psutil.Process(serve.pid).children()
        # python -m pagewire.services.cli NAME ...
        assert sorted(child.cmdline()[3] for child in children) == ["engine", "gateway", "tokenizer"]
        serve.kill()
        _, alive = psutil.wait_procs(children, timeout=EXIT_TIMEOUT_S)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"still running after the launcher was killed: {alive}\n{serve.log_tail()}"
    busy = {name: port for name, port in serve.ports.items() if not _port_free(port)}
    assert not busy, busy
