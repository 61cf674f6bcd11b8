"""A bad request fails alone, on every stream: the tokenizer's Tokenize and
Detokenize, the engine's Generate (driven directly with the pagewire.v1
stubs against the cluster's real processes), the gateway's public Generate,
and the REST shim.

Each session keeps one stream open and sends malformed, oversized and
adversarial items on it (every field of the request messages at each of its
extremes, then hypothesis draws), paced in batches, with a well-formed greedy
request between batches. Asserted per session: every well-formed request
ends exactly as it does on a stream of its own (the same tokens, text and
finish reason); the stream ends OK when the client half-closes; every item
gets a reply of its own: a refusal (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
NOT_FOUND, ... / HTTP 4xx) where the protos say it must be refused, a normal
end where they say it must be served; never UNKNOWN, INTERNAL or UNAVAILABLE,
never a 5xx; the gateway never reconnects to its peers; every process lives.

The inputs that broke a stream before issue 14 (a reply over the message
limit for a request under it, a duplicate Start) run alone as named cases,
and an undecodable message on each stream ends that stream only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pagewire.v1 import engine_pb2, engine_pb2_grpc, tokenizer_pb2
from tests.reliability.fuzz_inputs import TOKEN_DENSE_CHAR, Verdict
from tests.reliability.rest_fuzz import JSON_EXTREMES, JSON_TYPES, RestItem, fuzz_rest, rest_draws, rest_sweep
from tests.reliability.settings import MAX_MESSAGE_BYTES
from tests.reliability.stream_clients import StreamEnd
from tests.reliability.stream_hops import (
    GOOD_TEXTS,
    DetokenizeHop,
    EngineHop,
    Facts,
    GatewayHop,
    TokenizeHop,
    detokenize_draws,
    detokenize_goods,
    detokenize_item,
    detokenize_sweep,
    engine_draws,
    engine_goods,
    engine_sweep,
    gateway_draws,
    gateway_goods,
    gateway_sweep,
    generate_item,
    text_request,
    tokenize,
    tokenize_draws,
    tokenize_goods,
    tokenize_item,
    tokenize_sweep,
)
from tests.reliability.stream_sessions import BATCH, Hop, Item, Report, batched, fuzz_hop, run_session, unique
from tests.support.harness import Cluster

SHORT_EXAMPLES = 2
LONG_EXAMPLES = 40
# Longest a stream's replies may be held up by one item of the named cases.
STALL_S = 5.0
# A failing session is reported as drawn: shrinking would rerun sessions of seconds each.
HYPOTHESIS = {"deadline": None, "database": None, "derandomize": True, "phases": (Phase.explicit, Phase.generate), "suppress_health_check": list(HealthCheck)}


# --- the cluster --------------------------------------------------------------------------


def gateway_connects(cluster: Cluster) -> int:
    """Times the gateway has connected to a peer: more than at the start means a stream was lost."""
    text = cluster.gateway.log_path.read_text(errors="replace")
    return text.count('"event": "tokenizer connected"') + text.count('"event": "engine connected"')


@pytest.fixture(scope="module")
def facts(cluster: Cluster) -> Facts:
    cluster.start()

    async def read() -> tuple[engine_pb2.EngineInfo, list[tuple[int, ...]]]:
        async with grpc.aio.insecure_channel(cluster.engine.address) as channel:
            info = await engine_pb2_grpc.EngineStub(channel).Info(engine_pb2.EngineInfoRequest(), timeout=30)
        return info, [tuple(ids) for ids in await tokenize(cluster.tokenizer.address, GOOD_TEXTS)]

    info, prompts = asyncio.run(read())
    facts = Facts(cluster, info.model_id, info.vocab_size, info.max_model_len, info.eos_token_ids[0], tuple(prompts))
    _, alone, _ = asyncio.run(run_session(EngineHop(), cluster.engine.address, engine_goods(facts), [[]] * len(prompts)))
    return replace(facts, good_outputs=tuple(tuple(outcome.token_ids) for _, outcome in alone))


@dataclass
class Watched:
    facts: Facts
    connects: int


@pytest.fixture
def watched(facts: Facts) -> Watched:
    """The cluster serving (a test before may have broken a stream of the gateway's), and how often the gateway has connected."""
    facts.cluster.start()
    return Watched(facts, gateway_connects(facts.cluster))


def assert_unharmed(watched: Watched) -> None:
    """Every process still up, and the gateway never reconnected: no stream of its was lost."""
    cluster = watched.facts.cluster
    for service in cluster.services:
        assert service.alive, f"{service.name} died:\n{service.log_tail()}"
        service.wait_serving(10.0)
    assert gateway_connects(cluster) == watched.connects, f"the gateway lost a peer's stream:\n{cluster.gateway.log_tail()}"


def hypothesis_sessions(strategy: st.SearchStrategy[list[Any]], examples: int, session: Callable[[list[Any]], Awaitable[None]]) -> None:
    """Run `session` on each drawn list of items, on an event loop of its own
    (hypothesis drives synchronous tests); derandomized, so every run draws the same."""
    loop = asyncio.new_event_loop()

    @settings(max_examples=examples, **HYPOTHESIS)
    @given(items=strategy)
    def run(items: list[Any]) -> None:
        loop.run_until_complete(session(items))

    try:
        run()
    finally:
        loop.close()


def assert_kept(watched: Watched, reports: dict[str, Report], record_figures: Callable[[dict[str, Any]], None]) -> None:
    """Record the figures; fail on any breach of the contract, or a process or gateway stream lost."""
    record_figures({name: report.figures() for name, report in reports.items()})
    failures = [failure for report in reports.values() for failure in report.failures]
    assert not failures, f"{len(failures)} breaches:\n" + "\n".join(failures[:40])
    assert_unharmed(watched)


# --- the tests ---------------------------------------------------------------------------------


def fuzz_multiplexed(hop: Hop, address: str, goods: Sequence[Item], sweep: Sequence[Item], draws: st.SearchStrategy[Item], examples: int) -> Report:
    """The sweep in one session, then `examples` sessions of hypothesis draws."""
    report = Report()
    asyncio.run(fuzz_hop(hop, address, goods, batched(sweep), report))
    drawn = st.lists(draws, min_size=1, max_size=BATCH, unique_by=lambda item: item.request_id)
    hypothesis_sessions(drawn, examples, lambda items: fuzz_hop(hop, address, goods, batched(items, BATCH // 3), report))
    return report


def fuzz_engine(facts: Facts, examples: int) -> Report:
    return fuzz_multiplexed(EngineHop(), facts.cluster.engine.address, engine_goods(facts), engine_sweep(facts), engine_draws(facts), examples)


def fuzz_gateway(facts: Facts, examples: int) -> Report:
    return fuzz_multiplexed(GatewayHop(), facts.cluster.gateway.address, gateway_goods(facts), gateway_sweep(facts), gateway_draws(facts), examples)


def fuzz_detokenize(facts: Facts, examples: int) -> Report:
    goods = detokenize_goods(facts)
    return fuzz_multiplexed(DetokenizeHop(), facts.cluster.tokenizer.address, goods, detokenize_sweep(facts), detokenize_draws(facts), examples)


def fuzz_tokenize_stream(facts: Facts, examples: int) -> Report:
    return fuzz_multiplexed(TokenizeHop(), facts.cluster.tokenizer.address, tokenize_goods(), tokenize_sweep(), tokenize_draws(), examples)


def fuzz_rest_shim(facts: Facts, examples: int, values: Sequence[Any] = JSON_TYPES) -> Report:
    report = Report()
    url = facts.cluster.rest_url
    asyncio.run(fuzz_rest(url, batched(rest_sweep(values), 2 * BATCH), report))
    hypothesis_sessions(st.lists(rest_draws(), min_size=1, max_size=BATCH), examples, lambda items: fuzz_rest(url, [items], report))
    return report


def test_tokenize_stream_refuses_each_bad_request_alone(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {"tokenize": fuzz_tokenize_stream(watched.facts, SHORT_EXAMPLES)}, record_figures)


def test_detokenize_stream_refuses_each_bad_item_alone(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {"detokenize": fuzz_detokenize(watched.facts, SHORT_EXAMPLES)}, record_figures)


def test_engine_stream_refuses_each_bad_request_alone(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {"engine": fuzz_engine(watched.facts, SHORT_EXAMPLES)}, record_figures)


def test_gateway_stream_refuses_each_bad_request_alone(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {"gateway": fuzz_gateway(watched.facts, SHORT_EXAMPLES)}, record_figures)


def test_rest_shim_answers_each_bad_body_with_4xx(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {"rest": fuzz_rest_shim(watched.facts, SHORT_EXAMPLES)}, record_figures)


@pytest.mark.slow
def test_long_fuzz_of_every_stream(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    fuzzers = {"tokenize": fuzz_tokenize_stream, "detokenize": fuzz_detokenize, "engine": fuzz_engine, "gateway": fuzz_gateway}
    reports = {name: fuzz(watched.facts, LONG_EXAMPLES) for name, fuzz in fuzzers.items()}
    reports["rest"] = fuzz_rest_shim(watched.facts, LONG_EXAMPLES, JSON_EXTREMES)
    assert_kept(watched, reports, record_figures)


# --- undecodable messages ---------------------------------------------------------------

UNDECODABLE = (b"\xff\xff\xff", b"\x0a\x05\x0a\x03\xff\xfe\xfd")  # corrupt wire format; a string of bad UTF-8
STREAM_METHODS = {
    "tokenizer": ("/pagewire.v1.Tokenizer/Tokenize", "/pagewire.v1.Tokenizer/Detokenize"),
    "engine": ("/pagewire.v1.Engine/Generate",),
    "gateway": ("/pagewire.v1.Generation/Generate",),
}


async def undecodable(address: str, method: str, raw: bytes) -> StreamEnd:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(method)()
        await call.write(raw)
        await call.done_writing()
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass
        return StreamEnd(await call.code(), await call.details() or "")


def test_an_undecodable_message_ends_only_its_own_stream(watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    """No request id can be read from it, so it cannot fail alone: its stream
    ends with INVALID_ARGUMENT, and the gateway's streams to the same
    processes carry well-formed requests meanwhile, unchanged."""
    facts = watched.facts
    addresses = {service.name: service.address for service in facts.cluster.services}
    report = Report()

    async def session() -> list[tuple[str, StreamEnd]]:
        calls = [(method, undecodable(addresses[name], method, raw)) for name, methods in STREAM_METHODS.items() for method in methods for raw in UNDECODABLE]
        goods = gateway_goods(facts)
        *ends, _ = await asyncio.gather(*(call for _, call in calls), fuzz_hop(GatewayHop(), facts.cluster.gateway.address, goods, [[]] * len(goods), report))
        return [(method, end) for (method, _), end in zip(calls, ends, strict=True)]

    ends = asyncio.run(session())
    report.outcomes.update(f"{method} {end.code.name}" for method, end in ends)
    report.failures += [f"{method}: {end.code.name}: {end.details}" for method, end in ends if end.code is not grpc.StatusCode.INVALID_ARGUMENT]
    assert_kept(watched, {"undecodable": report}, record_figures)


# --- adversarial cases on their own -------------------------------------------------------


def dense_text(budget_bytes: int) -> str:
    """A text of `budget_bytes` UTF-8 bytes whose token ids take about twice as many bytes as the text."""
    return TOKEN_DENSE_CHAR * (budget_bytes // len(TOKEN_DENSE_CHAR.encode()))


def case_tokenize_dense_text(facts: Facts) -> Report:
    """A request under the message limit whose reply (its token ids) is over it."""
    report = Report()
    item = tokenize_item("dense text", tokenizer_pb2.TokenizeRequest(request_id=unique("dense"), text=dense_text(MAX_MESSAGE_BYTES * 3 // 4)))
    item.verdict += Verdict(may_refuse=["token ids over the message limit"])
    asyncio.run(fuzz_hop(TokenizeHop(), facts.cluster.tokenizer.address, tokenize_goods(), [[item]], report))
    return report


def case_detokenize_text_bomb(facts: Facts) -> Report:
    """An append under the message limit whose text is over it: a few
    thousand copies of the ids of a long run of spaces."""

    async def session() -> None:
        [spaces] = await tokenize(facts.cluster.tokenizer.address, [" " * 80], add_special_tokens=False)
        copies = 2 * MAX_MESSAGE_BYTES // 80
        item = detokenize_item(facts, f"{copies} copies of 80 spaces", tokenizer_pb2.DetokenizeStart(), spaces * copies)
        item.verdict += Verdict(may_refuse=["text over the message limit"])
        await fuzz_hop(DetokenizeHop(), facts.cluster.tokenizer.address, detokenize_goods(facts), [[item]], report)

    report = Report()
    asyncio.run(session())
    return report


def case_gateway_dense_text(facts: Facts) -> Report:
    """A prompt under the gateway's message limit whose token ids, coming back from the tokenizer, are over it."""
    report = Report()
    item = generate_item(facts, "dense text", text_request(dense_text(MAX_MESSAGE_BYTES * 3 // 4)))
    asyncio.run(fuzz_hop(GatewayHop(), facts.cluster.gateway.address, gateway_goods(facts), [[item]], report))
    return report


def case_gateway_duplicate_start(facts: Facts) -> Report:
    """A second Start under the id of a live request: refused, and the live request goes on with one end."""
    report = Report()
    item = Item("a duplicate Start of a live request", "", text_request("Hello"), Verdict(["a duplicate id"]), duplicate=True)
    asyncio.run(fuzz_hop(GatewayHop(), facts.cluster.gateway.address, gateway_goods(facts), [[item]], report))
    return report


def case_rest_dense_prompt(facts: Facts) -> Report:
    """The same prompt as a REST body."""
    report = Report()
    body = json.dumps({"prompt": dense_text(MAX_MESSAGE_BYTES * 3 // 4), "max_tokens": 1}, ensure_ascii=False).encode()
    asyncio.run(fuzz_rest(facts.cluster.rest_url, [[RestItem("dense prompt", "/v1/completions", body)]], report))
    return report


def case_detokenize_long_append_with_stop_strings(facts: Facts) -> Report:
    """One append of 16 times max_model_len ids that decode to no text (the
    EOS, skipped), with a stop string set: it must not hold up the
    well-formed requests on the stream for more than a few seconds. Taken a
    token at a time against a window that never advances, each token decodes
    everything before it, and the stream's one thread is busy for minutes."""
    report = Report()
    item = detokenize_item(facts, "a long append with a stop string", tokenizer_pb2.DetokenizeStart(stop=["\n\n"]), [facts.eos_token_id] * (16 * facts.max_model_len))
    item.verdict += Verdict(may_refuse=["more ids than a request can produce"])
    asyncio.run(fuzz_hop(DetokenizeHop(), facts.cluster.tokenizer.address, detokenize_goods(facts), [[item]], report, settle_s=STALL_S))
    return report


ADVERSARIAL_CASES: dict[str, Callable[[Facts], Report]] = {
    "tokenize-dense-text": case_tokenize_dense_text,
    "detokenize-text-bomb": case_detokenize_text_bomb,
    "gateway-dense-text": case_gateway_dense_text,
    "gateway-duplicate-start": case_gateway_duplicate_start,
    "rest-dense-prompt": case_rest_dense_prompt,
    "detokenize-long-append-with-stop-strings": case_detokenize_long_append_with_stop_strings,
}


@pytest.mark.parametrize("case", list(ADVERSARIAL_CASES))
def test_adversarial_case_fails_alone(case: str, watched: Watched, record_figures) -> None:  # type: ignore[no-untyped-def]
    assert_kept(watched, {case: ADVERSARIAL_CASES[case](watched.facts)}, record_figures)
