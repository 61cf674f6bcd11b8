"""One client process of benchmarks/rest.py: reads its share of the
workload as JSON on stdin, sends every request at once as OpenAI-style
/v1/completions (prompt token ids, greedy, ignore_eos; streamed or not) on
connections of their own, and writes the client-side clock of each request
as JSON on stdout with its own CPU time (benchmarks/client_process.py).
Several run at once, so that the client's own CPU is never what limits the
server; the benchmark reports how busy the busiest one was.

stdin: {"url", "prompts": {request id: ids}, "output_len", "stream", "start_at"}
with start_at a time.monotonic() instant (system-wide on Linux) at which
every client process begins."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from benchmarks.client_process import serve_share


async def _one(client: httpx.AsyncClient, prompt: list[int], output_len: int, stream: bool) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": stream}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return {"error": response.text[:300]}
        return {"finished": time.monotonic(), "tokens": response.json()["usage"]["completion_tokens"]}
    body["stream_options"] = {"include_usage": True}
    record: dict[str, Any] = {"tokens": 0}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": (await response.aread()).decode(errors="replace")[:300]}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                record["error"] = json.dumps(event["error"])[:300]
            elif event["choices"] and event["choices"][0]["text"]:
                record.setdefault("first_token", time.monotonic())
            elif event.get("usage"):
                record["tokens"] = event["usage"]["completion_tokens"]
    record["finished"] = time.monotonic()
    return record


async def run(work: dict[str, Any]) -> dict[str, Any]:
    # A connection per request, none waiting for a pool slot.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=work["url"], limits=limits, timeout=httpx.Timeout(None)) as client:
        await asyncio.sleep(max(0.0, work["start_at"] - time.monotonic()))
        ids = list(work["prompts"])
        results = await asyncio.gather(*(_one(client, work["prompts"][i], work["output_len"], work["stream"]) for i in ids))
    return dict(zip(ids, results))


if __name__ == "__main__":
    serve_share(run)
