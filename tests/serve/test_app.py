"""The Serve endpoint over real HTTP on 127.0.0.1: completions, chat, streaming and echo+logprobs
are well formed and agree with the model; bad input gets a 4xx naming the field; 200 concurrent
requests all succeed; with an API key set, requests without it get 401."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import requests
import torch
from transformers import AutoTokenizer

from serve.app import run_server
from tests.serve.conftest import delete_apps

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def url(serve_port, tiny_model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    try:
        yield run_server(tiny_model_dir, port=serve_port, api_key_file=str(key_file), max_batch_size=8)
    finally:
        delete_apps()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def post(url: str, route: str, body, headers=AUTH, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + route, data=data, headers={"Content-Type": "application/json", **headers},
                         timeout=60, **kw)


def greedy_reference(model64, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens by full forward passes in float64 (no cache) and the final log-probs [seq, vocab]."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model64(torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(ids):], model64(torch.tensor([seq])).logits[0].log_softmax(-1)


def test_echo_logprobs_equal_the_models(url, model64, tokenizer):
    ids = torch.randint(3, len(tokenizer), (10,), generator=torch.Generator().manual_seed(0)).tolist()
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0,
                                      "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    new, ref = greedy_reference(model64, ids, 3)
    full = ids + new
    want = ref[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in full]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    diff = (torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64) - want).abs().max().item()
    print("max |endpoint logprob - float64 forward|", diff)
    assert diff < 1e-4
    tops = [tokenizer.decode([int(ref[i].argmax())]) for i in range(len(full) - 1)]
    assert [list(t) for t in lp["top_logprobs"][1:]] == [[t] for t in tops]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(full))]
    assert choice["text"] == tokenizer.decode(ids) + tokenizer.decode(new)
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert body["object"] == "text_completion" and body["model"] == MODEL


def test_completions_take_a_list_of_prompts(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": ["The cat", "A dog ran"], "max_tokens": 5,
                                      "temperature": 0.8, "top_p": 0.9, "seed": 3, "stop": ["\n\n"]})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in choices)
    again = post(url, "/v1/completions", {"model": MODEL, "prompt": ["The cat", "A dog ran"], "max_tokens": 5,
                                          "temperature": 0.8, "top_p": 0.9, "seed": 3, "stop": ["\n\n"]})
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices]


def sse_events(r: requests.Response) -> list:
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_streaming_equals_the_plain_response(url):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    plain = post(url, "/v1/completions", body).json()["choices"][0]
    r = post(url, "/v1/completions", {**body, "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert len({e["id"] for e in events}) == 1
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    assert events[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_chat_uses_the_template(url, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out["usage"]["prompt_tokens"] == len(tokenizer(template, add_special_tokens=False).input_ids)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    same = post(url, "/v1/completions", {"model": MODEL, "prompt": tokenizer(template, add_special_tokens=False).input_ids,
                                         "max_tokens": 6, "temperature": 0}).json()
    assert out["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    events = sse_events(post(url, "/v1/chat/completions", {**body, "stream": True}, stream=True))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == out["choices"][0]["message"]["content"]


def test_models_and_health(url):
    assert requests.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == MODEL
    assert requests.get(url + "/health", headers=AUTH, timeout=10).json()["status"] == "ok"


OK = {"model": MODEL, "prompt": "hello"}
BAD = [
    # (route, body, status, param, words the message must hold)
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "prompt: required"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", "model: required"),
    ("/v1/completions", {**OK, "prompt": 7}, 400, "prompt", "prompt: expected a string"),
    ("/v1/completions", {**OK, "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {**OK, "prompt": [1, 10**9]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {**OK, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ("/v1/completions", {**OK, "max_tokens": 10**9}, 400, "max_tokens", "exceed the model's context of 256"),
    ("/v1/completions", {**OK, "prompt": "word " * 300}, 400, "prompt", "max_position_embeddings"),
    ("/v1/completions", {**OK, "temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", {**OK, "logprobs": True}, 400, "logprobs", "valid integer"),
    ("/v1/completions", {**OK, "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {**OK, "best_of": 2}, 400, "best_of", "unknown field"),
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here"),
    ("/v1/completions", {**OK, "stream": True, "echo": True}, 400, "stream", "one prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages",
     "messages[0].role"),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD)
def test_bad_input_gets_a_4xx_naming_the_field(url, route, body, status, param, words):
    r = post(url, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    print(error)
    assert error["param"] == param and words in error["message"] and error["type"]


def test_concurrent_load_all_succeeds(url):
    prompts = ["The sun", "Rain falls", "A small red house", "Two plus two", "Hello", "Once", "Why do birds", "Fish"]
    want = {p: post(url, "/v1/completions", {**OK, "prompt": p, "max_tokens": 4, "temperature": 0}).json()
            ["choices"][0]["text"] for p in prompts}

    def one(i: int) -> tuple[int, str, str]:
        p = prompts[i % len(prompts)]
        r = post(url, "/v1/completions", {**OK, "prompt": p, "max_tokens": 4, "temperature": 0})
        return r.status_code, p, r.json()["choices"][0]["text"] if r.ok else r.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [s for s, _, _ in results] == [200] * 200
    assert all(text == want[p] for _, p, text in results)  # batching changes no answer
    assert requests.get(url + "/health", headers=AUTH, timeout=10).ok


@pytest.mark.parametrize("method,route", [("get", "/health"), ("get", "/v1/models"), ("post", "/v1/completions"),
                                          ("post", "/v1/chat/completions")])
def test_api_key_is_required_on_every_route(url, method, route):
    body = json.dumps({"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.request(method, url + route, data=body, headers=headers, timeout=10)
        assert r.status_code == 401, (route, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
