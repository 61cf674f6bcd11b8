"""Messages within --max-message-bytes: exact entry sizes, batches packed and
split at the limit, and the gateway's outgoing streams merging only while
the merge fits."""

from __future__ import annotations

import asyncio

import pytest

from pagewire.services.common.errors import RequestError
from pagewire.services.common.message_size import entry_bytes, packed, split_batch
from pagewire.services.gateway.connection import OutgoingStream
from pagewire.v1 import engine_pb2, tokenizer_pb2


def _add(request_id: str, tokens: int) -> engine_pb2.AddRequest:
    return engine_pb2.AddRequest(request_id=request_id, prompt_token_ids=[40000] * tokens)


def test_entry_sizes_add_up_to_the_batch() -> None:
    results = [tokenizer_pb2.TokenizeResult(request_id=f"r{i}", token_ids=[7] * (i * 50)) for i in range(6)]
    assert sum(entry_bytes(r) for r in results) == tokenizer_pb2.TokenizedBatch(results=results).ByteSize()
    # Around the one-byte length's edge, and under a field number with a two-byte tag.
    for length in range(120, 136):
        result = tokenizer_pb2.TokenizeResult(request_id="r" * length)
        assert entry_bytes(result) == tokenizer_pb2.TokenizedBatch(results=[result]).ByteSize()
        assert entry_bytes(result, field_number=16) == entry_bytes(result) + 1


def test_packed_groups_fit_and_keep_the_order() -> None:
    results = [tokenizer_pb2.TokenizeResult(request_id=f"r{i}", token_ids=[7] * 100) for i in range(10)]
    groups = list(packed(results, 350))
    assert [r for group in groups for r in group] == results
    assert len(groups) > 1 and all(tokenizer_pb2.TokenizedBatch(results=group).ByteSize() <= 350 for group in groups)


def test_split_batch_cuts_at_the_limit_and_refuses_an_entry_that_cannot_fit() -> None:
    batch = engine_pb2.EngineInput(add=[_add(f"a{i}", 100) for i in range(5)], abort=["x", "y"])
    pieces = split_batch(batch, 700)
    assert all(piece.ByteSize() <= 700 for piece in pieces)
    assert [a.request_id for p in pieces for a in p.add] == [f"a{i}" for i in range(5)]
    assert [i for p in pieces for i in p.abort] == ["x", "y"]
    with pytest.raises(RequestError, match="--max-message-bytes 100"):
        split_batch(batch, 100)


def test_outgoing_stream_merges_only_while_the_merge_fits() -> None:
    async def session() -> list[engine_pb2.EngineInput]:
        stream: OutgoingStream[engine_pb2.EngineInput] = OutgoingStream(1000)
        for i in range(6):
            stream.send(engine_pb2.EngineInput(add=[_add(f"a{i}", 100)]))
        with pytest.raises(RequestError):
            stream.send(engine_pb2.EngineInput(add=[_add("huge", 1000)]))
        stream.send(engine_pb2.EngineInput(add=[_add(f"b{i}", 100) for i in range(4)]))
        stream.close()
        return [message async for message in stream.messages()]

    messages = asyncio.run(session())
    assert all(0 < m.ByteSize() <= 1000 for m in messages) and len(messages) < 10
    assert [a.request_id for m in messages for a in m.add] == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)]
