"""Tokenization is not serial: a tokenizer service process answers a small
prompt while a huge one, sent before it on the same Tokenize stream, is
still being encoded. Timings are compared with each other, never with a
fixed figure, so a slow or busy machine does not decide the outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from pagewire.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.support.harness import ServiceProcess
from tests.support.models import STRICT_CHAT_TEMPLATE, tokenizer_directory

SMALL = "How far is the Moon?"
# About 1.5 MB: seconds of encoding on a CPU.
HUGE = "The quick brown fox jumps over the lazy dog, again and again. " * 24_000
# Let the huge prompt's encoding be under way before the small one is sent.
HEAD_START_S = 0.2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer: Any) -> Iterator[ServiceProcess]:
    model = tokenizer_directory(tmp_path_factory.mktemp("model"), hf_tokenizer, STRICT_CHAT_TEMPLATE)
    service = ServiceProcess("tokenizer", ["--model", str(model)], log_path=tmp_path_factory.mktemp("logs") / "tokenizer.log")
    with service.running():
        yield service


class TokenizeStream:
    """One Tokenize stream: send requests, and wait for a request's result."""

    def __init__(self, call: grpc.aio.StreamStreamCall):
        self.call = call
        self.sent: dict[str, float] = {}
        self.arrived: dict[str, tuple[float, tokenizer_pb2.TokenizeResult]] = {}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for batch in self.call:
            for result in batch.results:
                self.arrived[result.request_id] = (time.monotonic(), result)

    async def send(self, request_id: str, text: str) -> None:
        self.sent[request_id] = time.monotonic()
        await self.call.write(tokenizer_pb2.TokenizeBatch(requests=[tokenizer_pb2.TokenizeRequest(request_id=request_id, text=text)]))

    async def latency(self, request_id: str) -> float:
        """Seconds from sending the request to its result, once that has come."""
        while request_id not in self.arrived:
            assert not self.reader.done(), "the stream ended"
            await asyncio.sleep(0.002)
        arrived, result = self.arrived[request_id]
        assert result.error.code == 0 and result.token_ids, result.error
        return arrived - self.sent[request_id]


async def _latencies(address: str) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = TokenizeStream(tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize())
        await stream.send("alone", SMALL)
        alone = await stream.latency("alone")
        await stream.send("huge", HUGE)
        await asyncio.sleep(HEAD_START_S)
        await stream.send("during", SMALL)
        during = await stream.latency("during")
        huge = await stream.latency("huge")
        await stream.call.done_writing()
        await stream.reader
        return {"alone": alone, "during": during, "huge": huge}


def test_a_small_prompt_is_answered_while_a_huge_one_is_still_being_encoded(tokenizer: ServiceProcess) -> None:
    seconds = asyncio.run(_latencies(tokenizer.address))
    # Serial encoding would keep the small prompt waiting for about all of the
    # huge one's time; side by side it waits for a small part of it.
    assert seconds["during"] < 0.1 * (seconds["huge"] - HEAD_START_S), (
        f"small prompt: {seconds['during'] / seconds['alone']:.0f} times its latency alone while the huge one encodes; {seconds}"
    )
