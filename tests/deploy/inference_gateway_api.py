"""The InferencePool (inference.networking.k8s.io/v1, Gateway API Inference
Extension) and HTTPRoute (gateway.networking.k8s.io/v1, Gateway API) kinds,
as their published v1 API references define them, and a check of a
manifest against them. No Kubernetes schema covers these custom resources,
so this is what stands in for the API server: unknown and missing fields,
types, enums, patterns, bounds, and the validation rules (CEL) it would
apply to what the overlay sets.

Fields the API has but whose contents the overlay never sets (filters,
retry, session persistence) are known and left unchecked; an object's
status is not part of a manifest."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A rule the API server evaluates on the whole value: (its message, holds).
Rule = tuple[str, Callable[[Any], bool]]


@dataclass(frozen=True)
class Str:
    pattern: str | None = None
    enum: tuple[str, ...] = ()
    min_length: int = 0
    max_length: int | None = None


@dataclass(frozen=True)
class Int:
    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True)
class Unchecked:
    """A field of the API whose contents are not checked."""


@dataclass(frozen=True)
class List:
    items: Schema
    min_items: int = 0
    max_items: int | None = None
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Map:
    keys: Str
    values: Schema
    min_properties: int = 0
    max_properties: int | None = None


@dataclass(frozen=True)
class Obj:
    fields: Mapping[str, Schema]
    required: frozenset[str] = field(default_factory=frozenset)
    rules: tuple[Rule, ...] = ()


Schema = Str | Int | Unchecked | List | Map | Obj


def problems(value: Any, schema: Schema, path: str = "") -> list[str]:
    """What the API server would refuse in `value`, one line each, by path."""
    where = path or "(root)"
    match schema:
        case Unchecked():
            return []
        case Str():
            return _string_problems(value, schema, where)
        case Int():
            return _integer_problems(value, schema, where)
        case List():
            if not isinstance(value, list):
                return [f"{where}: a list expected, got {value!r}"]
            found = _size_problems(len(value), schema.min_items, schema.max_items, "items", where)
            for index, item in enumerate(value):
                found += problems(item, schema.items, f"{path}[{index}]")
            return found + _rule_problems(value, schema.rules, where)
        case Map():
            if not isinstance(value, dict):
                return [f"{where}: a map expected, got {value!r}"]
            found = _size_problems(len(value), schema.min_properties, schema.max_properties, "entries", where)
            for key, item in value.items():
                found += problems(key, schema.keys, f"{path}[{key!r}] key") + problems(item, schema.values, f"{path}[{key!r}]")
            return found
        case Obj():
            if not isinstance(value, dict):
                return [f"{where}: an object expected, got {value!r}"]
            found = [f"{where}: unknown field {name!r}" for name in value if name not in schema.fields]
            found += [f"{where}: missing required field {name!r}" for name in sorted(schema.required - value.keys())]
            for name, item in value.items():
                if name in schema.fields:
                    found += problems(item, schema.fields[name], f"{path}.{name}" if path else name)
            return found + _rule_problems(value, schema.rules, where)
    raise TypeError(f"not a schema: {schema!r}")


def _string_problems(value: Any, schema: Str, where: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{where}: a string expected, got {value!r}"]
    found = _size_problems(len(value), schema.min_length, schema.max_length, "characters", where)
    if schema.enum and value not in schema.enum:
        found.append(f"{where}: {value!r} is not one of {list(schema.enum)}")
    if schema.pattern and not re.search(schema.pattern, value):
        found.append(f"{where}: {value!r} does not match {schema.pattern}")
    return found


def _integer_problems(value: Any, schema: Int, where: str) -> list[str]:
    if not isinstance(value, int) or isinstance(value, bool):
        return [f"{where}: an integer expected, got {value!r}"]
    if schema.minimum is not None and value < schema.minimum:
        return [f"{where}: {value} is below {schema.minimum}"]
    if schema.maximum is not None and value > schema.maximum:
        return [f"{where}: {value} is above {schema.maximum}"]
    return []


def _size_problems(size: int, least: int, most: int | None, unit: str, where: str) -> list[str]:
    if size < least:
        return [f"{where}: {size} {unit}, at least {least} needed"]
    if most is not None and size > most:
        return [f"{where}: {size} {unit}, at most {most} allowed"]
    return []


def _rule_problems(value: Any, rules: tuple[Rule, ...], where: str) -> list[str]:
    return [f"{where}: {message}" for message, holds in rules if not holds(value)]


# ---- shared types ---------------------------------------------------------

DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
GROUP = Str(pattern=rf"^$|^{DNS_SUBDOMAIN}$", max_length=253)
KIND = Str(pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$", min_length=1, max_length=63)
OBJECT_NAME = Str(min_length=1, max_length=253)
NAMESPACE = Str(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", min_length=1, max_length=63)
SECTION_NAME = Str(pattern=rf"^{DNS_SUBDOMAIN}$", min_length=1, max_length=253)
PORT_NUMBER = Int(minimum=1, maximum=65535)
LABEL_KEY = Str(pattern=rf"^({DNS_SUBDOMAIN}/)?([A-Za-z0-9][-A-Za-z0-9_.]{{0,61}})?[A-Za-z0-9]$", min_length=1, max_length=253)
LABEL_VALUE = Str(pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", max_length=63)
# The ObjectMeta fields a manifest of this overlay sets.
METADATA = Obj(
    {"name": OBJECT_NAME, "namespace": NAMESPACE, "labels": Map(LABEL_KEY, LABEL_VALUE), "annotations": Map(Str(), Str())},
    required=frozenset({"name"}),
)


def resource(api_version: str, kind: str, spec: Obj) -> Obj:
    return Obj(
        {"apiVersion": Str(enum=(api_version,)), "kind": Str(enum=(kind,)), "metadata": METADATA, "spec": spec},
        required=frozenset({"apiVersion", "kind", "metadata", "spec"}),
    )


# ---- InferencePool, inference.networking.k8s.io/v1 ------------------------

POOL_PORT = Obj({"number": PORT_NUMBER}, required=frozenset({"number"}))

ENDPOINT_PICKER_REF = Obj(
    {
        "group": GROUP,
        "kind": KIND,
        "name": OBJECT_NAME,
        "port": POOL_PORT,
        "failureMode": Str(enum=("FailOpen", "FailClose")),
    },
    required=frozenset({"name"}),
    rules=(("port is required when kind is 'Service' or unspecified (defaults to 'Service')", lambda ref: ref.get("kind", "Service") != "Service" or "port" in ref),),
)

INFERENCE_POOL = resource(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    Obj(
        {
            # Labels only (no matchExpressions), so that an implementation
            # can turn the pool into a Service selector.
            "selector": Obj({"matchLabels": Map(LABEL_KEY, LABEL_VALUE, min_properties=1, max_properties=64)}, required=frozenset({"matchLabels"})),
            "targetPorts": List(
                POOL_PORT,
                min_items=1,
                max_items=8,
                rules=(("port number must be unique", lambda ports: len({p.get("number") for p in ports}) == len(ports)),),
            ),
            "appProtocol": Str(enum=("http", "kubernetes.io/h2c")),
            # Required up to v1.5.0 of the API and by most implementations since.
            "endpointPickerRef": ENDPOINT_PICKER_REF,
        },
        required=frozenset({"selector", "targetPorts", "endpointPickerRef"}),
    ),
)


# ---- HTTPRoute, gateway.networking.k8s.io/v1 ------------------------------

DURATION = Str(pattern=r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def duration_s(text: str) -> float:
    """Seconds in a Gateway API duration such as "1h30m" or "500ms"."""
    return sum(int(amount) * _DURATION_UNITS[unit] for amount, unit in re.findall(r"([0-9]+)(ms|h|m|s)", text))


def _backend_request_within_request(timeouts: dict[str, str]) -> bool:
    request, backend = timeouts.get("request"), timeouts.get("backendRequest")
    if request is None or backend is None or duration_s(request) == 0:
        return True
    return duration_s(backend) <= duration_s(request)


PARENT_REFERENCE = Obj(
    {"group": GROUP, "kind": KIND, "namespace": NAMESPACE, "name": OBJECT_NAME, "sectionName": SECTION_NAME, "port": PORT_NUMBER},
    required=frozenset({"name"}),
)

PATH_MATCH = Obj(
    {"type": Str(enum=("Exact", "PathPrefix", "RegularExpression")), "value": Str(max_length=1024)},
    rules=(
        (
            "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
            lambda match: match.get("type", "PathPrefix") == "RegularExpression" or match.get("value", "/").startswith("/"),
        ),
        (
            "must not contain '//' when type one of ['Exact', 'PathPrefix']",
            lambda match: match.get("type", "PathPrefix") == "RegularExpression" or "//" not in match.get("value", "/"),
        ),
    ),
)

HEADER_NAME = Str(pattern=r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$", min_length=1, max_length=256)
NAME_VALUE_MATCH = Obj(
    {"type": Str(enum=("Exact", "RegularExpression")), "name": HEADER_NAME, "value": Str(min_length=1, max_length=4096)},
    required=frozenset({"name", "value"}),
)

ROUTE_MATCH = Obj(
    {
        "path": PATH_MATCH,
        "headers": List(NAME_VALUE_MATCH, max_items=16),
        "queryParams": List(NAME_VALUE_MATCH, max_items=16),
        "method": Str(enum=("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")),
    }
)

BACKEND_REF = Obj(
    {
        "group": GROUP,
        "kind": KIND,
        "name": OBJECT_NAME,
        "namespace": NAMESPACE,
        "port": PORT_NUMBER,
        "weight": Int(minimum=0, maximum=1_000_000),
        "filters": List(Unchecked(), max_items=16),
    },
    required=frozenset({"name"}),
    # group defaults to "" (core) and kind to Service.
    rules=(("Must have port for Service reference", lambda ref: ref.get("group", "") != "" or ref.get("kind", "Service") != "Service" or "port" in ref),),
)

ROUTE_RULE = Obj(
    {
        "name": SECTION_NAME,
        "matches": List(ROUTE_MATCH, max_items=64),
        "filters": List(Unchecked(), max_items=16),
        "backendRefs": List(BACKEND_REF, max_items=16),
        "timeouts": Obj(
            {"request": DURATION, "backendRequest": DURATION},
            rules=(("backendRequest timeout cannot be longer than request timeout", _backend_request_within_request),),
        ),
        "retry": Unchecked(),
        "sessionPersistence": Unchecked(),
    }
)

HTTP_ROUTE = resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    Obj(
        {
            "parentRefs": List(PARENT_REFERENCE, max_items=32),
            "hostnames": List(Str(pattern=rf"^(\*\.)?{DNS_SUBDOMAIN}$", min_length=1, max_length=253), max_items=16),
            "rules": List(ROUTE_RULE, max_items=16),
        }
    ),
)
