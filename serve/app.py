"""The Ray Serve application: one deployment, `ZebraServer`, that hosts a checkpoint behind
OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models, /health).

Start it with `run_server(model_dir, ...)` (what `zebra serve DIR` calls) or with
`serve run serve/config.yaml`, whose `import_path` is `build_app` below.
Every request, streamed or not, goes to the replica's engine (serve.engine), which batches all of them
continuously; tokenisation and response building run off the event loop. Bad input is refused before
any work starts: a 400 naming the field, a 413 past the body-size or prompt-count limits.
"""
import asyncio
import hmac
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Callable

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.schema import ApplicationStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_api as api
from serve.engine import Completion, Engine, Prompt, Sampling, Update, check_model_dir

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

    The API key is never an argument: each replica reads it itself, from api_key_file (a file on the
    replica's node, which wins) or from its own environment variable api_key_env, so it never enters
    Ray's runtime env, the Serve config or a log. When a key is found, every route requires
    `Authorization: Bearer <key>`. A Ray that run_server starts inherits the caller's environment; on a
    cluster, set the variable on the nodes or ship the file.
    max_batch_size: sequences the engine decodes at once; max_len: longest prompt + completion (default:
    the model's context); cache_budget_bytes: cache memory for the running sequences (serve.engine.Engine).
    max_body_bytes, max_prompts: a larger request body, or more prompts in one request, gets a 413.
    """

    model_config = ConfigDict(extra="forbid")

    model_dir: str
    model_name: str | None = None
    api_key_env: str | None = "ZEBRA_API_KEY"
    api_key_file: str | None = None
    max_batch_size: int = Field(64, ge=1)
    max_len: int | None = Field(None, ge=1)
    cache_budget_bytes: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    max_prompts: int = Field(256, ge=1)
    device: str | None = None
    dtype: str | None = None


def model_name_of(model_dir: str | Path) -> str:
    """The name clients put in `model`: the checkpoint folder's last path part."""
    return str(model_dir).rstrip("/").rsplit("/", 1)[-1]


def read_api_key(args: ServeArgs) -> str | None:
    """The key from args.api_key_file (FileNotFoundError/ValueError naming it when missing or empty),
    else from $args.api_key_env, else None."""
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file {path}: no such file on this node")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"api_key_file {path}: the file is empty")
        return key
    return os.environ.get(args.api_key_env) if args.api_key_env else None


def _sampling(req: api.CompletionRequest | api.ChatRequest) -> Sampling:
    return Sampling(req.max_tokens, req.temperature, req.top_p, req.top_k, req.stops(), req.seed, req.ignore_eos)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; APIError(413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = api.APIError(413, f"request body: larger than this server's limit of {limit} bytes (max_body_bytes)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _settle(future: asyncio.Future, update: Update) -> None:
    if not future.done():
        future.set_result(update)


def _failed(update: Update) -> api.APIError:
    return api.APIError(500, f"generation failed: {update.error}", type="server_error")


# The route functions are frozen with the FastAPI app when the class is decorated, so every
# module-level name they use must already exist here, above the class.
@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class ZebraServer:
    """One replica: a model on its device behind the OpenAI routes, its engine batching every request."""

    def __init__(self, **kwargs):
        self.args = args = ServeArgs(**kwargs)
        self.api_key = read_api_key(args)  # first: a missing key file fails before the model loads
        self.engine = Engine.load(args.model_dir, device=args.device, dtype=args.dtype, max_batch=args.max_batch_size,
                                  max_len=args.max_len, cache_budget_bytes=args.cache_budget_bytes)
        self.model_name = args.model_name or model_name_of(args.model_dir)
        if not self.api_key:
            log.warning("serving %s without an API key (api_key_file=%s, $%s unset here)", self.model_name,
                        args.api_key_file, args.api_key_env)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread died is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the engine's scheduler thread has stopped")

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
        self.check_health()
        engine = {"max_batch": self.engine.max_batch, "max_len": self.engine.max_len,
                  "cache_budget_bytes": self.engine.cache_budget}
        return {"status": "ok", "model": self.model_name, "engine": engine}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return api.models_body(self.model_name)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = api.parse_request(await _read_body(request, self.args.max_body_bytes), api.CompletionRequest)
        api.check_model(req.model, self.model_name)
        prompts = await asyncio.to_thread(self._completion_prompts, req)
        if req.stream:
            id = api.new_id("text_completion")
            return await self._stream(prompts[0], [], lambda text, reason: api.completion_chunk(
                id, self.model_name, text, reason))
        results = await asyncio.gather(*(self._complete(p) for p in prompts))
        return await asyncio.to_thread(self._completion_body, req, results)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        req = api.parse_request(await _read_body(request, self.args.max_body_bytes), api.ChatRequest)
        api.check_model(req.model, self.model_name)
        if not self.engine.tokenizer.chat_template:
            raise api.APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                               "messages")
        ids = await asyncio.to_thread(self.engine.chat_ids, [m.model_dump() for m in req.messages])
        api.check_prompt(ids, req.max_tokens, self.engine.max_len, self.engine.vocab_size, 0)
        prompt = self._checked(Prompt(tuple(ids), _sampling(req)))
        if req.stream:
            id = api.new_id("chat.completion.chunk")
            role = api.chat_chunk(id, self.model_name, {"role": "assistant"}, None)
            return await self._stream(prompt, [role], lambda text, reason: api.chat_chunk(
                id, self.model_name, {"content": text} if text else {}, reason))
        return api.chat_body(self.model_name, await self._complete(prompt))

    def _checked(self, prompt: Prompt) -> Prompt:
        """The prompt, or APIError(400) naming the field the engine refuses (sampling range, length, budget)."""
        try:
            self.engine.check(prompt)
        except ValueError as e:
            raise api.APIError(400, str(e), str(e).split(":", 1)[0]) from None
        return prompt

    def _completion_prompts(self, req: api.CompletionRequest) -> list[Prompt]:
        """Tokenize and check every prompt of the request (APIError naming the bad one); runs in a thread."""
        count = 1 if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else len(req.prompt)
        if count > self.args.max_prompts:
            raise api.APIError(413, f"prompt: {count} prompts in one request; this server takes at most "
                                    f"{self.args.max_prompts} (max_prompts)", "prompt")
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
        return [self._checked(Prompt(tuple(ids), sampling, req.logprobs, req.echo)) for ids in id_lists]

    def _completion_body(self, req: api.CompletionRequest, results: list[Completion]) -> dict:
        texts = [self.engine.decode(r.prompt_ids) + r.text if req.echo else r.text for r in results]
        return api.completion_body(self.model_name, results, texts, self.engine.token_text, req.logprobs is not None)

    async def _complete(self, prompt: Prompt) -> Completion:
        """Submit to the engine and wait for the completion; a cancelled request (client gone) stops decoding."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def notify(update: Update) -> None:
            if update.finish_reason is not None:
                loop.call_soon_threadsafe(_settle, future, update)

        handle = self.engine.submit(prompt, notify)
        try:
            update = await future
        finally:
            handle.cancel()  # a no-op once finished
        if update.error is not None:
            raise _failed(update)
        return update.completion

    async def _stream(self, prompt: Prompt, head: list[dict], chunk: Callable[[str, str | None], dict]):
        """Server-sent events of one prompt, closed by `data: [DONE]`. The response starts only after the
        first token: a failure before it is an HTTP error, not a 200 with a cut stream."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        handle = self.engine.submit(prompt, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u), stream=True)
        try:
            first = await updates.get()
        except BaseException:
            handle.cancel()
            raise
        if first.error is not None:
            raise _failed(first)

        async def events() -> AsyncIterator[str]:
            try:
                for event in head:
                    yield api.sse(event)
                update = first
                while update.error is None:
                    yield api.sse(chunk(update.text, update.finish_reason))
                    if update.finish_reason is not None:
                        break
                    update = await updates.get()
                if update.error is not None:
                    yield api.sse(_failed(update).body())
                yield api.sse("[DONE]")
            finally:
                handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict) -> Application:
    """Application builder for `serve run serve/config.yaml` (args: the fields of ServeArgs); a local
    model folder is checked here, before any replica starts."""
    checked = ServeArgs.model_validate(args)
    if not checked.model_dir.startswith("s3://"):
        check_model_dir(checked.model_dir)
    return ZebraServer.bind(**checked.model_dump())


def run_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    autoscaling: dict | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    api_key_env: str | None = "ZEBRA_API_KEY",
    model_name: str | None = None,
    max_batch_size: int = 64,
    app_name: str = "zebra",
    route_prefix: str = "/",
    blocking: bool = False,
    start_timeout_s: float = 600.0,
    **args,
) -> str:
    """Serve the checkpoint at model_dir (a folder or s3://bucket/prefix) and return the base URL.

    autoscaling: a Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests,
    upscale_delay_s, downscale_delay_s, ...); None serves one replica. num_cpus / num_gpus are per
    replica; a fraction of a GPU lets replicas share one. args: more ServeArgs fields (api_key_file,
    max_len, cache_budget_bytes, max_body_bytes, max_prompts, device, dtype). Connects to the running
    Ray cluster, or starts a local one; host and port apply when this call starts Serve (a running
    Serve keeps its own). Several applications can share Serve under different app_name and route_prefix.

    Refused before anything is deployed: a local folder that is not a complete checkpoint, more GPUs per
    replica than the cluster has. A replica that fails to start ends the deployment at its first failure,
    and RuntimeError gives its cause; TimeoutError after start_timeout_s gives Serve's last status.
    """
    serve_args = ServeArgs(model_dir=str(model_dir), model_name=model_name, api_key_env=api_key_env,
                           max_batch_size=max_batch_size, **args)
    if not serve_args.model_dir.startswith("s3://"):
        check_model_dir(model_dir)
    if not ray.is_initialized():
        ray.init()
    _check_gpus(num_gpus)
    serve.start(http_options={"host": host, "port": port})
    deployment = ZebraServer.options(**_deployment_options(autoscaling, num_cpus, num_gpus))
    serve._run(deployment.bind(**serve_args.model_dump()), _blocking=False, name=app_name, route_prefix=route_prefix)
    _wait_until_running(app_name, model_dir, start_timeout_s)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    _check_key_is_enforced(url, serve_args, app_name)
    if blocking:
        from ray.serve._private.utils import wait_for_interrupt

        wait_for_interrupt()
    return url


def _deployment_options(autoscaling: dict | None, num_cpus: float, num_gpus: float) -> dict:
    """Replica resources and scaling; one constructor attempt, so a broken model fails the deploy at once."""
    scaling = {"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": 1}
    return {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}, "max_constructor_retry_count": 1,
            **scaling}


def _check_gpus(num_gpus: float) -> None:
    """ValueError when a replica asks for more GPUs than the whole Ray cluster has."""
    have = ray.cluster_resources().get("GPU", 0)
    if num_gpus > have:
        raise ValueError(f"num_gpus: each replica asks for {num_gpus} GPU(s), but the Ray cluster has {have:g}; "
                         "serve with num_gpus 0 on the CPU, or connect to a cluster with GPUs")


def _wait_until_running(app_name: str, model_dir: str | Path, timeout_s: float) -> None:
    """Poll Serve until the application runs; on DEPLOY_FAILED, RuntimeError with the replica's error."""
    start = time.monotonic()
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            serve.delete(app_name, _blocking=False)
            messages = [status.message] + [d.message for d in status.deployments.values()]
            tries = re.search(r"failed to start (\d+) times", " ".join(messages))
            attempts = f" ({tries.group(1)} attempt{'s' * (tries.group(1) != '1')})" if tries else ""
            raise RuntimeError(f"serving {model_dir} failed: a replica could not start{attempts}: {_cause(messages)}")
        if time.monotonic() - start > timeout_s:
            message = status.message if status is not None else "no status"
            serve.delete(app_name, _blocking=False)
            raise TimeoutError(f"serving {model_dir}: not running after {timeout_s:g} s (start_timeout_s); "
                               f"Serve says: {message}")
        time.sleep(0.5)


def _cause(messages: list[str]) -> str:
    """The last exception line of the replica tracebacks in Serve's status messages (else all messages)."""
    lines = [ln.strip() for m in messages for ln in m.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errors[-1] if errors else " ".join(lines)


def _check_key_is_enforced(url: str, args: ServeArgs, app_name: str) -> None:
    """RuntimeError (and the app deleted) when the key is set here but the replicas serve without it."""
    if args.api_key_file or not (args.api_key_env and os.environ.get(args.api_key_env)):
        return
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30):
            open_route = True
    except urllib.error.HTTPError as e:
        open_route = e.code != 401
    if open_route:
        serve.delete(app_name)
        raise RuntimeError(f"${args.api_key_env} is set here, but the replicas do not see it and would serve without "
                           "a key: set it where the Ray cluster was started, or pass api_key_file")
