"""The launcher's relay of a child's output (services/common/children.py)."""

from __future__ import annotations

import asyncio
import collections

import pytest

from pagewire.services.common.children import TAIL_LINES, _relay_output


def test_a_last_line_without_its_newline_does_not_run_into_the_next_record(capsys: pytest.CaptureFixture[str]) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    async def relay() -> None:
        output = asyncio.StreamReader()
        output.feed_data(b"one\ntwo, unterminated")
        output.feed_eof()
        await _relay_output(output, tail)

    asyncio.run(relay())
    # Whatever the launcher writes next starts a line of its own.
    assert capsys.readouterr().err == "one\ntwo, unterminated\n"
    assert list(tail) == ["one", "two, unterminated"]
