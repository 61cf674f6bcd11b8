"""LoRA adapters and two models behind one gateway, through real processes:
a tokenizer, an engine of a tiny Llama serving an adapter, an engine of
another model, and a gateway with an API key. /v1/models lists both models
and the adapter (its parent the base model); a request for the adapter (by
REST model or the gRPC lora field) equals HF + PEFT greedy; unknown ones are
404 / NOT_FOUND naming them; adapters load and unload at run time behind
the key."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.engine import tiny_models
from tests.support.harness import ServiceProcess, start_all, stop_all
from tests.support.lora_adapters import ALL_TARGETS, prompt, write_adapter
from tests.support.models import STRICT_CHAT_TEMPLATE, tokenizer_directory

API_KEY = "sk-lora"
MAX_NEW_TOKENS = 8
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("lora-gateway")
    torch.manual_seed(0)
    base = tiny_models.llama3_scaled().eval()
    base.save_pretrained(root / "tiny-base")
    other = LlamaForCausalLM(LlamaConfig(**tiny_models.TINY, tie_word_embeddings=True)).eval()
    other.save_pretrained(root / "tiny-other")
    adapters = {
        "styled": write_adapter(base, root / "styled", 8, 16, ALL_TARGETS, seed=1),
        "later": write_adapter(base, root / "later", 4, 8, ["q_proj", "v_proj"], seed=2),
    }
    broken = write_adapter(base, root / "broken", 4, 8, ["q_proj"], seed=3)
    config = json.loads((broken / "adapter_config.json").read_text()) | {"use_dora": True}
    (broken / "adapter_config.json").write_text(json.dumps(config))
    tokenizer = ServiceProcess("tokenizer", ["--model", str(tokenizer_directory(root / "tok", hf_tokenizer, STRICT_CHAT_TEMPLATE))], log_path=root / "tok.log")
    common = ["--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "128"]
    lora_engine = ServiceProcess(
        "engine", ["--model", str(root / "tiny-base"), *common, "--lora", f"styled={adapters['styled']}", "--max-lora-rank", "8"], log_path=root / "e1.log"
    )
    other_engine = ServiceProcess("engine", ["--model", str(root / "tiny-other"), *common], log_path=root / "e2.log")
    flags = ["--tokenizer", tokenizer.address, "--engine", lora_engine.address, "--engine", other_engine.address, "--api-key", API_KEY]
    gateway = ServiceProcess("gateway", flags, log_path=root / "gateway.log")
    processes = [tokenizer, lora_engine, other_engine, gateway]
    try:
        start_all(processes)
        references = {"": base, **{name: PeftModel.from_pretrained(copy.deepcopy(base), path).eval() for name, path in adapters.items()}}
        yield {"gateway": gateway, "adapters": adapters, "broken": broken, "references": references}
    finally:
        stop_all(processes)


def _complete(served: dict, ids: list[int], **fields: str) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        token_ids=gateway_pb2.TokenIds(ids=ids), sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), **fields
    )
    with grpc.insecure_channel(served["gateway"].address) as channel:
        stub = gateway_pb2_grpc.GenerationStub(channel)
        return [t for chunk in stub.Complete(request, metadata=[("authorization", HEADERS["Authorization"])], timeout=60) for t in chunk.token_ids]


def _models(served: dict) -> dict[str, dict]:
    response = httpx.get(f"{served['gateway'].rest_url}/v1/models", headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


def _admin(served: dict, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{served['gateway'].rest_url}/v1/{path}", json=body, headers=HEADERS if headers is None else headers, timeout=60)


def test_models_lists_both_models_and_the_adapter(served: dict) -> None:
    models = _models(served)
    assert set(models) == {"tiny-base", "tiny-other", "styled"}
    assert models["styled"]["parent"] == "tiny-base" and "parent" not in models["tiny-base"]


def test_adapter_requests_equal_peft_and_route_to_its_replica(served: dict) -> None:
    ids, references = prompt(seed=5), served["references"]
    expected = tiny_models.hf_greedy(references["styled"], ids, MAX_NEW_TOKENS)
    assert _complete(served, ids, model="styled") == expected
    assert _complete(served, ids, model="tiny-base", lora="styled") == expected
    assert _complete(served, ids, model="tiny-base") == tiny_models.hf_greedy(references[""], ids, MAX_NEW_TOKENS)
    assert len(_complete(served, ids, model="tiny-other")) == MAX_NEW_TOKENS
    rest = httpx.post(
        f"{served['gateway'].rest_url}/v1/completions", json={"model": "styled", "prompt": ids, "max_tokens": 2, "temperature": 0}, headers=HEADERS, timeout=60
    )
    assert rest.status_code == 200 and rest.json()["model"] == "styled", rest.text


def test_metrics_show_the_adapter_slots(served: dict) -> None:
    text = httpx.get(f"{served['gateway'].rest_url}/metrics", timeout=30).text
    (series,) = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert 'max_lora="4"' in series  # the adapter engine's default --max-loras; the other engine has none


def test_unknown_models_and_adapters_are_not_found(served: dict) -> None:
    rest = httpx.post(f"{served['gateway'].rest_url}/v1/completions", json={"model": "nope", "prompt": [5, 6], "max_tokens": 2}, headers=HEADERS, timeout=30)
    assert rest.status_code == 404 and "'nope'" in rest.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as missing:
        _complete(served, [5, 6], model="tiny-base", lora="nope")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in missing.value.details()
    with pytest.raises(grpc.RpcError) as elsewhere:
        _complete(served, [5, 6], model="tiny-other", lora="styled")  # loaded on the other model's replica only
    assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_and_unload_at_run_time_behind_the_key(served: dict) -> None:
    body = {"lora_name": "later", "lora_path": str(served["adapters"]["later"]), "model": "tiny-base"}
    assert _admin(served, "load_lora_adapter", body, headers={}).status_code == 401
    loaded = _admin(served, "load_lora_adapter", body)
    assert loaded.status_code == 200, loaded.text
    assert _models(served)["later"]["parent"] == "tiny-base"
    ids = prompt(seed=6)
    assert _complete(served, ids, model="later") == tiny_models.hf_greedy(served["references"]["later"], ids, MAX_NEW_TOKENS)
    assert _admin(served, "unload_lora_adapter", {"lora_name": "later"}).status_code == 200
    assert "later" not in _models(served)
    gone = _admin(served, "unload_lora_adapter", {"lora_name": "later"})
    assert gone.status_code == 404 and "'later'" in gone.json()["error"]["message"]
    # Named to the adapter engine: without a model the gateway may pick the other engine, which has no LoRA slots.
    refused = _admin(served, "load_lora_adapter", {"lora_name": "broken", "lora_path": str(served["broken"]), "model": "tiny-base"})
    assert refused.status_code == 400 and "DoRA" in refused.json()["error"]["message"], refused.text
    assert set(_models(served)) == {"tiny-base", "tiny-other", "styled"}
