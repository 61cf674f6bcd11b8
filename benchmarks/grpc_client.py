"""One gRPC client process of benchmarks/rest.py's `grpc_streams` door: reads
its share of the workload as JSON on stdin, sends it on a `Generate` stream
of its own (its own channel, so its own connection: the kernel spreads the
connections over the gateway workers that share the port) and writes the
client-side clock of each request as JSON on stdout, in the records of
benchmarks/rest_client.py, with its own CPU time (benchmarks/client_process.py).

stdin: {"target", "prompts": {request id: ids}, "output_len", "start_at"}
with start_at a time.monotonic() instant (system-wide on Linux) at which
every client process begins. It imports only grpc and the stubs, so that it
is ready well before start_at (importing torch, as the benchmarks' other
modules do, took longer than the start delay on a busy host)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from benchmarks.client_process import serve_share
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# Chunks of a whole step for every request come in one ServerMessage.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def client_messages(request_ids: list[str], prompts: list[list[int]], output_len: int, token_ids_only: bool = False) -> list[gateway_pb2.ClientMessage]:
    """The gateway's Generate requests of the workload: prompt token ids, greedy, EOS ignored
    (and with token_ids_only, output ids without text)."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    return [
        gateway_pb2.ClientMessage(
            start=gateway_pb2.GenerateRequest(request_id=i, token_ids=gateway_pb2.TokenIds(ids=p), sampling=sampling, token_ids_only=token_ids_only)
        )
        for i, p in zip(request_ids, prompts)
    ]  # fmt: skip


async def run(work: dict[str, Any]) -> dict[str, dict[str, Any]]:
    request_ids = list(work["prompts"])
    messages = client_messages(request_ids, [work["prompts"][i] for i in request_ids], work["output_len"])
    records: dict[str, dict[str, Any]] = {i: {"tokens": 0} for i in request_ids}
    async with grpc.aio.insecure_channel(work["target"], options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, work["start_at"] - time.monotonic()))
        async for reply in gateway_pb2_grpc.GenerationStub(channel).Generate(iter(messages)):
            now = time.monotonic()
            for chunk in reply.chunks:
                record = records[chunk.request_id]
                if chunk.token_ids:
                    record["tokens"] += len(chunk.token_ids)
                    record.setdefault("first_token", now)
                if chunk.error.code:
                    record["error"] = chunk.error.message[:300]
                if chunk.finish_reason:
                    record["finished"] = now
    return records


if __name__ == "__main__":
    serve_share(run)
