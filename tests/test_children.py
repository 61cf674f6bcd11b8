"""The launcher's relay of a child's output (services/common/children.py)."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from pagewire.services.common.children import ChildCommand, report_death, start_child
from pagewire.services.common.logging import configure_logging


def test_a_last_line_without_its_newline_does_not_run_into_the_next_record(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", service="serve")

    async def run() -> None:
        child = await start_child("writer", ChildCommand([sys.executable, "-c", "import sys; sys.stdout.write('one\\ntwo, unterminated')"], {}))
        await child.process.wait()
        await child.relay
        report_death(child)

    asyncio.run(run())
    started, *relayed, exited = capsys.readouterr().err.splitlines()
    assert json.loads(started)["event"] == "started"
    assert relayed == ["one", "two, unterminated"]
    assert json.loads(exited)["event"] == "child exited"
