"""One gRPC client process of benchmarks/rest.py's `grpc_streams` door: reads
its share of the workload as JSON on stdin, sends it on a `Generate` stream
of its own (its own channel, so its own connection: the kernel spreads the
connections over the gateway workers that share the port) and writes the
client-side clock of each request as JSON on stdout, in the records of
benchmarks/rest_client.py.

stdin: {"target", "prompts": {request id: ids}, "output_len", "start_at"}
with start_at a time.monotonic() instant (system-wide on Linux) at which
every client process begins."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc

from benchmarks.through_gateway import CHANNEL_OPTIONS, client_messages
from pagewire.v1 import gateway_pb2_grpc


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


def main() -> None:
    work = json.load(sys.stdin)
    sys.stdout.write(json.dumps(asyncio.run(run(work))))


if __name__ == "__main__":
    main()
