"""The Ray Serve application: one deployment, `ZebraServer`, that hosts a checkpoint behind
OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models, /health).

Start it with `run_server(model_dir, ...)` (what `zebra serve DIR` calls) or with
`serve run serve/config.yaml`, whose `import_path` is `build_app` below.
Non-streaming prompts from concurrent requests are gathered by `@serve.batch`; a streamed request
decodes on its own, in Starlette's thread pool.
"""
import asyncio
import hmac
import logging
import os
from pathlib import Path
from typing import Iterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_api as api
from serve.engine import Completion, Engine, Prompt, Sampling

log = logging.getLogger(__name__)

app = FastAPI(title="Zebra")


@app.exception_handler(api.APIError)
async def _api_error(request: Request, exc: api.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    error = api.APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = api.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code)


class ServeArgs(BaseModel):
    """Arguments of the application (the `args:` block of a Serve config file).

    api_key_env: name of the environment variable holding the API key; when that variable is set
    in the replica, every route requires `Authorization: Bearer <key>`.
    """

    model_config = ConfigDict(extra="forbid")

    model_dir: str
    model_name: str | None = None
    api_key_env: str | None = "ZEBRA_API_KEY"
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    device: str | None = None
    dtype: str | None = None


def model_name_of(model_dir: str | Path) -> str:
    """The name clients put in `model`: the checkpoint folder's last path part."""
    return str(model_dir).rstrip("/").rsplit("/", 1)[-1]


def _sampling(req: api.CompletionRequest | api.ChatRequest) -> Sampling:
    return Sampling(req.max_tokens, req.temperature, req.top_p, req.stops(), req.seed)


def _sse(events: Iterator[dict]) -> StreamingResponse:
    """Server-sent events, closed by `data: [DONE]`; a sync iterator, so Starlette runs it in a thread."""

    def lines() -> Iterator[str]:
        for event in events:
            yield api.sse(event)
        yield api.sse("[DONE]")

    return StreamingResponse(lines(), media_type="text/event-stream")


# The route functions are frozen with the FastAPI app when the class is decorated, so every
# module-level name they use must already exist here, above the class.
@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class ZebraServer:
    """One replica: a model on its device behind the OpenAI routes."""

    def __init__(self, **kwargs):
        args = ServeArgs(**kwargs)
        self.engine = Engine.load(args.model_dir, device=args.device, dtype=args.dtype)
        self.model_name = args.model_name or model_name_of(args.model_dir)
        self.api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        if not self.api_key:
            log.warning("serving %s without an API key (api_key_env=%s, unset here)", self.model_name, args.api_key_env)
        self.generate.set_max_batch_size(args.max_batch_size)
        self.generate.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            raise api.APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               type="authentication_error")

    @app.get("/health")
    async def health(self, request: Request) -> dict:
        self._authorize(request)
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return api.models_body(self.model_name)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = api.parse_request(await request.body(), api.CompletionRequest)
        api.check_model(req.model, self.model_name)
        prompts = self._completion_prompts(req)
        if req.stream:
            return _sse(self._completion_events(prompts[0]))
        results = await asyncio.gather(*(self.generate(p) for p in prompts))
        texts = [self.engine.decode(r.prompt_ids) + r.text if req.echo else r.text for r in results]
        return api.completion_body(self.model_name, results, texts, self.engine.token_text, req.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        req = api.parse_request(await request.body(), api.ChatRequest)
        api.check_model(req.model, self.model_name)
        if not self.engine.tokenizer.chat_template:
            raise api.APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                               "messages")
        ids = self.engine.chat_ids([m.model_dump() for m in req.messages])
        api.check_prompt(ids, req.max_tokens, self.engine.max_len, self.engine.vocab_size, 0)
        prompt = Prompt(tuple(ids), _sampling(req))
        if req.stream:
            return _sse(self._chat_events(prompt))
        return api.chat_body(self.model_name, await self.generate(prompt))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, prompts: list[Prompt]) -> list[Completion]:
        """Complete the prompts gathered from concurrent requests, off the event loop."""
        return await asyncio.to_thread(self.engine.complete, prompts)

    def _completion_prompts(self, req: api.CompletionRequest) -> list[Prompt]:
        """Tokenize and check every prompt of the request (APIError naming the bad one)."""
        id_lists = api.prompt_token_lists(req.prompt)
        if id_lists is None:
            id_lists = [self.engine.encode(text) for text in api.prompt_texts(req.prompt)]
        if not id_lists:
            raise api.APIError(400, "prompt: the list of prompts is empty", "prompt")
        if req.stream and (len(id_lists) > 1 or req.echo or req.logprobs is not None):
            raise api.APIError(400, "stream: a streamed request takes one prompt, without echo or logprobs", "stream")
        for i, ids in enumerate(id_lists):
            api.check_prompt(ids, req.max_tokens, self.engine.max_len, self.engine.vocab_size, i)
        sampling = _sampling(req)
        return [Prompt(tuple(ids), sampling, req.logprobs, req.echo) for ids in id_lists]

    def _completion_events(self, prompt: Prompt) -> Iterator[dict]:
        id = api.new_id("text_completion")
        for text, reason in self.engine.stream(prompt):
            yield api.completion_chunk(id, self.model_name, text, reason)

    def _chat_events(self, prompt: Prompt) -> Iterator[dict]:
        id = api.new_id("chat.completion.chunk")
        yield api.chat_chunk(id, self.model_name, {"role": "assistant"}, None)
        for text, reason in self.engine.stream(prompt):
            yield api.chat_chunk(id, self.model_name, {"content": text} if text else {}, reason)


def build_app(args: dict) -> Application:
    """Application builder for `serve run serve/config.yaml` (args: the fields of ServeArgs)."""
    return ZebraServer.bind(**ServeArgs.model_validate(args).model_dump())


def run_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    autoscaling: dict | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    api_key_env: str | None = "ZEBRA_API_KEY",
    model_name: str | None = None,
    max_batch_size: int = 8,
    app_name: str = "zebra",
    route_prefix: str = "/",
    blocking: bool = False,
) -> str:
    """Serve the checkpoint at model_dir (a folder or s3://bucket/prefix) and return the base URL.

    autoscaling: a Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests,
    upscale_delay_s, downscale_delay_s, ...); None serves one replica. num_cpus / num_gpus are per
    replica; a fraction of a GPU lets replicas share one. The API key is read from $api_key_env here
    and handed to the replicas. Connects to the running Ray cluster, or starts a local one; host and
    port apply when this call starts Serve (a running Serve keeps its own). Several applications
    can share Serve under different app_name and route_prefix.
    """
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    args = ServeArgs(model_dir=str(model_dir), model_name=model_name, api_key_env=api_key_env,
                     max_batch_size=max_batch_size)
    deployment = ZebraServer.options(**_deployment_options(autoscaling, num_cpus, num_gpus, api_key_env))
    serve.run(deployment.bind(**args.model_dump()), name=app_name, route_prefix=route_prefix, blocking=blocking)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def _deployment_options(autoscaling: dict | None, num_cpus: float, num_gpus: float, api_key_env: str | None) -> dict:
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        actor["runtime_env"] = {"env_vars": {api_key_env: key}}
    scaling = {"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": 1}
    return {"ray_actor_options": actor, **scaling}
