"""`spac-gguf serve`: an OpenAI-compatible HTTP server over one ModelPair.

One model context, so one generation at a time: requests queue (FIFO) for a single worker thread
that owns the pair, and each gets its own answer (every generation starts from a fresh context).
Tokens reach the client as they are made (`stream: true`, server-sent events); a client that goes
away cancels its generation at the next token and frees the context for the next request. Bad
requests get OpenAI-style JSON errors with 4xx codes; nothing answers with a traceback.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model, under its alias
    POST /v1/completions         prompt -> text
    POST /v1/chat/completions    messages -> the GGUF's chat template -> text
    GET  /metrics                Prometheus text: requests, tokens, tokens/s, acceptance, cache
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatError, ChatTemplate
from .llama_backend import BackendError

MAX_STOPS = 4                       # as the OpenAI API


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1                                      # one choice per request (one model context)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


@dataclass
class Job:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)


# What /metrics shows, one line a metric: (name, type, help, key). The key names the worker's count
# (WORKER_METRICS) or a field of pair.cache_stats() (CACHE_METRICS); a value of None is left out.
WORKER_METRICS = (
    ("requests_total", "counter", "generations finished (cancelled included)", "requests"),
    ("requests_cancelled_total", "counter", "generations stopped because the client went away", "cancelled"),
    ("request_errors_total", "counter", "requests that failed", "errors"),
    ("requests_queued", "gauge", "requests waiting for the model", "queued"),
    ("prompt_tokens_total", "counter", "prompt tokens processed", "prompt_tokens"),
    ("tokens_generated_total", "counter", "tokens generated", "generated_tokens"),
    ("tokens_per_second", "gauge", "generation speed of the last request", "last_tps"),
    ("draft_acceptance_ratio", "gauge", "accepted / drafted tokens of the last request", "last_acceptance"),
)
CACHE_METRICS = (
    ("cache_hit_ratio", "gauge", "routed experts served from GPU slots", "hit_rate"),
    ("cache_bytes_loaded_total", "counter", "bytes copied into slots between passes", "bytes_loaded"),
    ("cache_inpass_loads_total", "counter", "misses copied into slots during passes", "inpass_loads"),
    ("cache_inpass_bytes_total", "counter", "bytes copied into slots during passes", "inpass_bytes"),
    ("cache_cpu_scale", "gauge", "the CPU's measured time per expert over the hardware profile's", "cpu_scale"),
)


class Worker:
    """The one thread that touches the pair: runs queued jobs in order."""

    def __init__(self, pair, draft_max: int):
        self.pair, self.draft_max = pair, draft_max
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.metrics: dict[str, float | None] = {key: 0 for *_, key in WORKER_METRICS}
        self.metrics["last_acceptance"] = None        # no drafts yet: left out of /metrics
        self.lock = threading.Lock()                  # guards metrics
        self.thread = threading.Thread(target=self._run, name="spac-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            self.metrics["queued"] += 1
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            cancelled = job.cancel.is_set()             # its client went away while it waited
            with self.lock:
                self.metrics["queued"] -= 1
                self.metrics["cancelled"] += cancelled
            if not cancelled:
                self._serve(job)

    def _serve(self, job: Job) -> None:
        def put(item):
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)

        pair = self.pair
        try:
            tokens = pair.tokenize(job.prompt)           # once: generate() takes the ids
            n_prompt, n_ctx = len(tokens), pair.target_ctx.n_ctx
            if n_prompt + 1 >= n_ctx:                  # generate() refuses it too; this names the OpenAI code
                raise APIError(400, f"the prompt has {n_prompt} tokens; this server's context holds {n_ctx} (-c)",
                               "prompt", "context_length_exceeded")
            gen = pair.generate(tokens, max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                seed=job.seed, draft_max=self.draft_max if pair.draft_ctx is not None else 0)
            text, emitted, n, finish = "", 0, 0, None
            hold = max((len(s) for s in job.stops), default=1) - 1   # a stop string may straddle tokens
            try:
                for tok in gen:
                    if job.cancel.is_set():
                        finish = "cancelled"
                        break
                    n += 1
                    text += tok.text
                    cuts = [i for i in (text.find(s, max(0, emitted - len(s))) for s in job.stops) if i >= 0]
                    if cuts:
                        if min(cuts) > emitted:
                            put(("text", text[emitted:min(cuts)]))
                        finish = "stop"
                        break
                    safe = len(text) - hold
                    if safe > emitted:
                        put(("text", text[emitted:safe]))
                        emitted = safe
                else:
                    if len(text) > emitted:
                        put(("text", text[emitted:]))
                    st = pair.last_stats
                    finish = "stop" if st is not None and st.stop_reason == "eog" else "length"
            finally:
                gen.close()                           # frees the context for the next job
            st = pair.last_stats
            with self.lock:
                m = self.metrics
                m["requests"] += 1
                m["cancelled"] += finish == "cancelled"
                m["prompt_tokens"] += n_prompt
                m["generated_tokens"] += n
                if st is not None:
                    m["last_tps"], m["last_acceptance"] = st.tokens_per_second, st.acceptance_rate
            put(("done", finish, {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}))
        except Exception as e:                        # noqa: BLE001 - never a traceback to the client
            with self.lock:
                self.metrics["errors"] += 1
            put(("error", _as_api_error(e)))


def _as_api_error(e: Exception) -> APIError:
    """What the client is told about an exception of a generation."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):                     # InputError, ChatError: the request's fault
        return APIError(400, str(e))
    if isinstance(e, BackendError):
        return APIError(500, f"backend error: {e}", kind="server_error")
    return APIError(500, f"internal error: {type(e).__name__}", kind="server_error")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop holds at most {MAX_STOPS} strings", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return stops


def make_app(pair, *, alias: str, draft_max: int = 4, template: ChatTemplate | None = None) -> FastAPI:
    """The ASGI app over `pair` (owned by the app's worker from now on; `app.state.worker.stop()` ends it)."""
    app = FastAPI(title="spac-gguf", docs_url=None, redoc_url=None, openapi_url=None)
    worker = Worker(pair, draft_max)
    app.state.worker = worker
    if template is None:
        template = ChatTemplate(pair.target.chat_template(), **pair.target.special_tokens())
    created = int(time.time())
    n_ctx = pair.target_ctx.n_ctx

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        msg = first.get("msg", "invalid request")
        return APIError(400, f"{'.'.join(loc) or 'body'}: {msg}", ".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

    def check_model(name: str | None) -> None:
        if name is not None and name != alias:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{alias}')", "model",
                           "model_not_found")

    def make_job(req: _Sampling, prompt: str, max_tokens: int | None) -> Job:
        if req.n != 1:
            raise APIError(400, f"n must be 1 here: one choice per request (got {req.n})", "n")
        if max_tokens is None:
            max_tokens = n_ctx                         # until the end of the text or of the context
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1 (got {max_tokens})", "max_tokens")
        return Job(prompt=prompt, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                   stops=_stops(req.stop), loop=asyncio.get_running_loop(), out=asyncio.Queue())

    async def events(job: Job, request: Request) -> AsyncIterator[tuple]:
        """The job's items; the client going away cancels it."""
        worker.submit(job)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                        return
                    continue
                yield item
                if item[0] in ("done", "error"):
                    return
        finally:
            job.cancel.set()                           # a no-op once the job is done

    async def collect(job: Job, request: Request) -> tuple[str, str, dict]:
        parts, finish, usage = [], "length", {}
        async for item in events(job, request):
            if item[0] == "text":
                parts.append(item[1])
            elif item[0] == "error":
                raise item[1]
            else:
                finish, usage = item[1], item[2]
        return "".join(parts), finish, usage

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(job: Job, request: Request, chunk) -> AsyncIterator[str]:
        first = True
        async for item in events(job, request):
            if item[0] == "error":
                yield sse(item[1].body())
                break
            if item[0] == "text":
                yield sse(chunk(item[1], None, first))
                first = False
            else:
                yield sse(chunk("", item[1] if item[1] != "cancelled" else "stop", first))
                yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": alias, "object": "model", "created": created, "owned_by": "spac-gguf"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (a list of exactly one string)", "prompt")
            prompt = prompt[0]
        job = make_job(req, prompt, req.max_tokens if req.max_tokens is not None else 16)
        cid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, first=True):                 # a stream's chunk and the whole answer alike
            return {"id": cid, "object": "text_completion", "created": now, "model": alias,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if req.stream:
            return StreamingResponse(stream(job, request, chunk), media_type="text/event-stream")
        text, finish, usage = await collect(job, request)
        return {**chunk(text, finish), "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        try:
            prompt = template.render([m.model_dump() for m in req.messages])
        except ChatError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = make_job(req, prompt, max_tokens)
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            def chunk(text, finish, first):
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": alias,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(stream(job, request, chunk), media_type="text/event-stream")
        text, finish, usage = await collect(job, request)
        return {"id": cid, "object": "chat.completion", "created": now, "model": alias,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}], "usage": usage}

    @app.get("/metrics")
    async def metrics():
        with worker.lock:
            m = dict(worker.metrics)
        cache = pair.cache_stats() if getattr(pair, "engine", None) is not None else None
        values = [m[key] for *_, key in WORKER_METRICS] + [cache.get(key) for *_, key in CACHE_METRICS if cache]
        lines = []
        for (name, kind, help_, _), value in zip(WORKER_METRICS + CACHE_METRICS, values):
            if value is not None:
                lines += [f"# HELP spac_{name} {help_}", f"# TYPE spac_{name} {kind}", f"spac_{name} {float(value):g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
