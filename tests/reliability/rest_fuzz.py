"""The REST shim as the fuzz tests drive it: bodies with every field of
/v1/completions and /v1/chat/completions set to any JSON value, sent a
batch at a time with well-formed requests among them. Every answer must be
200 or a 4xx with the OpenAI error body, never a 5xx."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import strategies as st

from pagewire.services.gateway.openai_schemas import ChatBody, CompletionBody, SamplingFields
from tests.reliability.fuzz_inputs import HUGE_LIST, HUGE_TEXT_CHARS, SPECIAL_TEXTS, UINT32_MAX
from tests.reliability.settings import MAX_MESSAGE_BYTES
from tests.reliability.stream_hops import GOOD_CHAT, GOOD_MAX_TOKENS, GOOD_TEXTS
from tests.reliability.stream_sessions import REFUSALS, SETTLE_S, Report

REST_REFUSALS = {400, 404, 413, 415, 422, 429}

COMPLETION_BASE = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
CHAT_BASE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 0}
# Any JSON value a field may be given: every type, and the extremes of
# numbers, strings and lists (the numeric ranges of the fields themselves are
# swept on the gRPC streams).
JSON_EXTREMES = (
    *(None, True, -1, 1.5, -0.0, 5e-324, 1e308, 2**64, -(2**63), math.nan, -math.inf),
    *("", SPECIAL_TEXTS[0], "x" * HUGE_TEXT_CHARS, [], [UINT32_MAX], [1] * HUGE_LIST, {}),
)
# One value of each JSON type, and the integer past every bound: the short run's sweep.
JSON_TYPES = (None, True, -1, 1.5, 2**64, math.nan, "", [], {})
# Fields that can make a valid request run to max_model_len: sent streaming, and dropped after a few events.
UNBOUNDED_FIELDS = {"max_tokens", "max_completion_tokens"}
DROP_AFTER_EVENTS = 3
RAW_BODIES = (b"", b"{", b"null", b"[]", b"\xff\xfe\x00", b'{"prompt": "\\ud800", "max_tokens": 1}', b'{"prompt": "a", "max_tokens": 1, "max_tokens": 2}', b"{" * 10_000)


@dataclass
class RestItem:
    """A body to POST; a streamed one read up to `drop_after` events, then dropped."""

    name: str
    path: str
    body: bytes
    drop_after: int | None = None


@dataclass
class RestReply:
    """The answer: its status, the error body or event, the text and the finish reason."""

    status: int
    error: dict[str, Any] | None
    text: str
    finish: str | None


def json_item(name: str, path: str, body: dict[str, Any], drop_after: int | None = None) -> RestItem:
    return RestItem(name, path, json.dumps(body, allow_nan=True).encode(), drop_after)


async def rest_call(client: httpx.AsyncClient, item: RestItem) -> RestReply:
    """POST the item and read its answer, streamed or not, to its end (or drop it after `drop_after` events)."""
    async with client.stream("POST", item.path, content=item.body, headers={"content-type": "application/json"}) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
            try:
                data = response.json()
            except json.JSONDecodeError:
                return RestReply(response.status_code, {"unparsable body": response.text[:200]}, "", None)
            if response.status_code != 200:
                return RestReply(response.status_code, data.get("error") if isinstance(data, dict) else data, "", None)
            choice = data["choices"][0]
            return RestReply(200, None, choice.get("text") or choice.get("message", {}).get("content") or "", choice["finish_reason"])
        reply = RestReply(response.status_code, None, "", None)
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            events += 1
            if "error" in event:
                reply.error = event["error"]
            for choice in event.get("choices", []):
                reply.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
                reply.finish = choice.get("finish_reason") or reply.finish
            if item.drop_after is not None and events >= item.drop_after:
                reply.finish = reply.finish or "dropped"
                break
        return reply


def judge_rest(reply: RestReply) -> str | None:
    """Why the reply breaks the contract; None when it keeps it. A stream
    that began with 200 may still end with an error event of a refusal."""
    if reply.status == 200:
        if reply.error is not None:
            return None if reply.error.get("code") in {code.name for code in REFUSALS} else f"an error event {reply.error}"
        return None if reply.finish else "200 without a finish reason"
    if reply.status not in REST_REFUSALS:
        return f"HTTP {reply.status}: {reply.error}"
    if not isinstance(reply.error, dict) or not {"message", "type", "code"} <= reply.error.keys():
        return f"HTTP {reply.status} without the OpenAI error body: {reply.error}"
    return None


def rest_goods() -> list[RestItem]:
    good = {"max_tokens": GOOD_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    chat = [{"role": role, "content": content} for role, content in GOOD_CHAT]
    return [
        json_item("completion", "/v1/completions", {**good, "prompt": GOOD_TEXTS[0]}),
        json_item("streamed completion", "/v1/completions", {**good, "prompt": GOOD_TEXTS[1], "stream": True}),
        json_item("chat", "/v1/chat/completions", {**good, "messages": chat}),
    ]


def rest_sweep(values: Sequence[Any]) -> list[RestItem]:
    """Every field of both bodies (from the shim's own schemas; the fields
    both share, on /v1/completions) at each of `values`, and raw bodies."""
    items = []
    chat_only = ChatBody.model_fields.keys() - SamplingFields.model_fields.keys()
    for path, base, names in (("/v1/completions", COMPLETION_BASE, CompletionBody.model_fields), ("/v1/chat/completions", CHAT_BASE, chat_only)):
        for name in sorted(names):
            streamed = {"stream": True} if name in UNBOUNDED_FIELDS else {}
            drop = DROP_AFTER_EVENTS if streamed else None
            items += [json_item(f"{path} {name}={json.dumps(value)[:24]}", path, {**base, **streamed, name: value}, drop) for value in values]
    items += [RestItem(f"raw body {raw[:12]!r}", "/v1/completions", raw) for raw in RAW_BODIES]
    items.append(json_item("a body over --max-message-bytes", "/v1/completions", {**COMPLETION_BASE, "prompt": "x" * MAX_MESSAGE_BYTES}))
    return items


@st.composite
def rest_draws(draw: st.DrawFn) -> RestItem:
    """A valid body with a few fields set to any JSON value (extremes favoured)."""
    path, base, schema = draw(st.sampled_from([("/v1/completions", COMPLETION_BASE, CompletionBody), ("/v1/chat/completions", CHAT_BASE, ChatBody)]))
    values = st.sampled_from(JSON_EXTREMES) | st.integers() | st.floats() | st.text(max_size=16) | st.lists(st.integers(-1, 2**33), max_size=4)
    fields = draw(st.dictionaries(st.sampled_from(sorted(schema.model_fields)), values, min_size=1, max_size=4))
    streamed = {"stream": True} if UNBOUNDED_FIELDS & fields.keys() else {}
    return json_item(f"hypothesis draw {json.dumps(fields)[:60]}", path, {**base, **streamed, **fields}, DROP_AFTER_EVENTS if streamed else None)


async def rest_session(url: str, goods: Sequence[RestItem], schedule: Sequence[Sequence[RestItem]]) -> tuple[list[tuple[RestItem, RestReply]], list[tuple[RestItem, RestReply]]]:
    """Each batch at once on one keep-alive client, a well-formed request among them."""
    results, goods_seen = [], []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=SETTLE_S, limits=limits) as client:
        for index, batch in enumerate(schedule):
            good = goods[index % len(goods)]
            replies = await asyncio.gather(rest_call(client, good), *(rest_call(client, item) for item in batch))
            goods_seen.append((good, replies[0]))
            results += zip(batch, replies[1:], strict=True)
        assert (await client.get("/health")).status_code == 200
    return results, goods_seen


# What the well-formed requests give alone: measured once per run.
_baseline: dict[str, RestReply] = {}


async def fuzz_rest(url: str, schedule: Sequence[Sequence[RestItem]], report: Report) -> None:
    started = time.monotonic()
    goods = rest_goods()
    if not _baseline:
        _, alone = await rest_session(url, goods, [[]] * len(goods))
        _baseline.update({good.name: reply for good, reply in alone})
    baseline = _baseline
    results, goods_seen = await rest_session(url, goods, schedule)
    report.sessions += 1
    report.goods += len(goods_seen)
    for good, reply in goods_seen:
        if reply != baseline[good.name]:
            report.failures.append(f"REST: well-formed {good.name} changed by the noise: {reply} != {baseline[good.name]}")
    for item, reply in results:
        report.items += 1
        report.outcomes[str(reply.status)] += 1
        if (problem := judge_rest(reply)) is not None:
            report.failures.append(f"REST: {item.name}: {problem}")
    report.wall_s += time.monotonic() - started
