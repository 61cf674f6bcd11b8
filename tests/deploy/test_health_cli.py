"""`pagewire health HOST:PORT` — the probe compose healthchecks run — exits 0
only while the target reports SERVING."""

from __future__ import annotations

import asyncio
import shutil

from pagewire.services.common.grpc_utils import start_server
from pagewire.services.common.tls import TlsFiles
from tests.support.harness import free_port

SERVICE = "pagewire.v1.Engine"


async def probe(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        shutil.which("pagewire") or "pagewire", "health", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    return process.returncode or 0, stdout.decode().strip()


def test_health_follows_the_server_through_its_life() -> None:
    async def scenario() -> None:
        running = await start_server("127.0.0.1", 0, 1 << 20, [], [SERVICE])
        target = f"127.0.0.1:{running.port}"
        try:
            # Started: alive as a whole, the named service not ready yet.
            assert await probe(target) == (0, "SERVING")
            assert await probe(target, "--service", SERVICE) == (1, "NOT_SERVING")
            await running.set_serving(True)
            assert await probe(target, "--service", SERVICE) == (0, "SERVING")
            assert (await probe(target, "--service", "pagewire.v1.Unknown"))[0] == 1
            # Draining (what SIGTERM does): neither ready nor serving.
            await running.set_serving(False)
            assert await probe(target, "--service", SERVICE) == (1, "NOT_SERVING")
            assert await probe(target) == (1, "NOT_SERVING")
        finally:
            await running.server.stop(None)

    asyncio.run(scenario())


def test_health_fails_fast_on_a_closed_port() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await probe(f"127.0.0.1:{free_port()}", "--timeout", "5") == (1, "NOT_SERVING")
        assert loop.time() - started < 5

    asyncio.run(scenario())


def test_health_probes_a_tls_port_with_its_ca_file(tls_files: TlsFiles) -> None:
    async def scenario() -> None:
        running = await start_server("127.0.0.1", 0, 1 << 20, [], [SERVICE], credentials=tls_files.grpc_server_credentials())
        await running.set_serving(True)
        target = f"127.0.0.1:{running.port}"
        try:
            assert await probe(target, "--service", SERVICE, "--ca-file", str(tls_files.cert_path)) == (0, "SERVING")
            # Plaintext against a TLS port is not an answer.
            assert await probe(target, "--service", SERVICE, "--timeout", "2") == (1, "NOT_SERVING")
            missing = await probe(target, "--ca-file", str(tls_files.cert_path) + ".missing")
            assert missing[0] == 2 and missing[1] == ""
        finally:
            await running.server.stop(None)

    asyncio.run(scenario())
