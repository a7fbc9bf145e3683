"""The OpenAI-compatible wire format: request schemas, their validation, and the response bodies.

Errors use OpenAI's shape `{"error": {"message", "type", "param"}}`; every message names the field
that is wrong and what would be right. Nothing here touches the model; the limits that depend on it
(context length, vocabulary) are passed in.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.engine import MAX_SEED, MAX_STOP_CHARS, MAX_STOPS, MAX_TEMPERATURE, MIN_TEMPERATURE, Completion

Schema = TypeVar("Schema", bound=BaseModel)

# Top-level fields whose type is a union: pydantic reports one error per member, we name the union.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
}


class APIError(Exception):
    """A request the server refuses; becomes an HTTP `status` with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


class _Request(BaseModel):
    # strict: "1" is not an int and true is not a number; extra keys are errors naming the key; no NaN or inf.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension (as vLLM's): the k likeliest tokens, 0 for all
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False  # an extension (as vLLM's): decode max_tokens whatever the model emits
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 for greedy decoding or a value of at least {MIN_TEMPERATURE}")
        return value

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple; an empty string is refused (it would stop before any text)."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(s == "" for s in stops):
            raise APIError(400, "stop: stop strings must be non-empty", "stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", "stop")
        return stops


class CompletionRequest(_Request):
    """POST /v1/completions. `logprobs=k` returns each token's log-prob and the k likeliest
    alternatives; with `echo` the prompt's tokens come first (the first one has no log-prob)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """POST /v1/chat/completions; the messages go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


def parse_request(body: bytes, schema: type[Schema]) -> Schema:
    """Parse a JSON body into `schema`; APIError(400) naming the first bad field otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # also: bad UTF-8, integers of > 4300 digits, deep nesting
        raise APIError(400, f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise APIError(400, _describe(e.errors()[0], schema), _param(e.errors()[0])) from None


def _param(error: dict) -> str | None:
    return str(error["loc"][0]) if error["loc"] else None


def _describe(error: dict, schema: type[BaseModel]) -> str:
    field = _param(error)
    if field is None:
        return f"request body must be a JSON object with the fields {sorted(schema.model_fields)}: {error['msg']}"
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown field; allowed fields: {sorted(schema.model_fields)}"
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    if field in _EXPECTED and error["type"].endswith("_type"):
        return f"{field}: expected {_EXPECTED[field]}"
    return f"{_where(error['loc'])}: {error['msg']}"


def _where(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union-member tags such as 'list[int]' are dropped."""
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool"):
            out += f".{part}"
    return out


def prompt_token_lists(prompt) -> list[list[int]] | None:
    """The prompt as token-id lists when it was sent as token ids, None when it was text."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], str):
        return None
    return [prompt] if isinstance(prompt[0], int) else prompt


def prompt_texts(prompt) -> list[str]:
    """The prompt as a list of strings (call only when prompt_token_lists returned None)."""
    return [prompt] if isinstance(prompt, str) else list(prompt)


def check_prompt(ids: list[int], max_tokens: int, max_len: int, vocab_size: int, index: int) -> None:
    """Refuse prompt `index` when empty, holding ids outside the vocabulary, or too long for the model."""
    where = f"prompt[{index}]"
    if not ids:
        raise APIError(400, f"{where}: the prompt has no tokens; send at least one", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{where}: token ids {bad[:5]} lie outside the vocabulary [0, {vocab_size})", "prompt")
    if len(ids) > max_len:
        raise APIError(
            400, f"{where}: {len(ids)} tokens, but the model's context holds {max_len} (max_position_embeddings)", "prompt"
        )
    if len(ids) + max_tokens > max_len:
        raise APIError(
            400,
            f"max_tokens: {len(ids)} prompt tokens + {max_tokens} new tokens exceed the model's context of "
            f"{max_len} tokens; ask for at most {max_len - len(ids)}",
            "max_tokens",
        )


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"model: {requested!r} is not served here; this server serves {served!r}", "model",
                       type="model_not_found")


# -- responses -----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    """A response id; every chunk of one stream carries the same one."""
    return f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"


def _envelope(kind: str, model: str, choices: list[dict], id: str | None = None) -> dict:
    return {"id": id or new_id(kind), "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def _usage(results: list[Completion]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in results)
    completion = sum(len(r.output_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_body(result: Completion, token_text: Callable[[int], str]) -> dict:
    """OpenAI's legacy logprobs object; `text_offset` counts characters along the `tokens` strings."""
    ids = result.logprob_ids()
    tokens = [token_text(t) for t in ids]
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top = [None if d is None else {token_text(t): lp for t, lp in d.items()} for d in result.top_logprobs]
    return {"tokens": tokens, "token_logprobs": result.token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_body(model: str, results: list[Completion], texts: list[str], token_text, logprobs: bool) -> dict:
    """The /v1/completions response; `texts[i]` is choice i's text (with the prompt when echoed)."""
    choices = [
        {"index": i, "text": text, "finish_reason": r.finish_reason,
         "logprobs": logprobs_body(r, token_text) if logprobs else None}
        for i, (r, text) in enumerate(zip(results, texts))
    ]
    return {**_envelope("text_completion", model, choices), "usage": _usage(results)}


def chat_body(model: str, result: Completion) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}
    return {**_envelope("chat.completion", model, [choice]), "usage": _usage([result])}


def completion_chunk(id: str, model: str, text: str, finish_reason: str | None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _envelope("text_completion", model, [choice], id)


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return _envelope("chat.completion.chunk", model, [{"index": 0, "delta": delta, "finish_reason": finish_reason}], id)


def sse(payload: dict | str) -> str:
    """One server-sent event line: `data: {...}` or `data: [DONE]`."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def models_body(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "zebra"}]}
