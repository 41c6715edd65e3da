"""The inference server: the OpenAI completions API, CodeGPT's own JSON API and the page, all
decoding through one scheduler that batches concurrent requests into the rows of one KV cache
(serve/scheduler.py), with a base and any number of its adapters served at once.

    GET  /                the page (serve/static/index.html), which calls /v1/completions
    GET  /health          liveness
    GET  /info            models, parameters, tokenizer, device, slots, limits, the decoding step's graph
    GET  /presets         prompt formats of the tasks (free completion, docstring, bug fix, fill in the middle)
    GET  /v1/models       the base and every adapter (serve/openai_api.py)
    POST /v1/completions  OpenAI's completions, streamed or not
    POST /generate        {"prompt", "suffix", "model", "max_new_tokens", "temperature", "top_k", "top_p",
                          "stop", "seed", "stream"}: CodeGPT's own API, kept for its callers

A client that disconnects, streaming or not, stops its sequences (queued ones never start).
Bodies over the limit get 413, whether they declare their length or arrive chunked; bodies that
are not UTF-8 or not JSON, nested too deeply or holding too long a number, and out-of-range values
get 400 naming the field, each API in its own error format.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from codegpt.base.generate import banned_ids, not_trained_for_infilling
from codegpt.base.model import GPT
from codegpt.base.sampling import BadOption, Sampling
from codegpt.base.slots import RowAdapters, SlotEngine
from codegpt.base.tokenizer import Tokenizer
from codegpt.serve import openai_api
from codegpt.serve.scheduler import QueueFull, Request, Sequence
from codegpt.serve.serving import BadBody, Limits, ServedModel, Serving, read_json
from codegpt.tasks.humaneval import STOP as HUMANEVAL_STOP
from codegpt.tasks.registry import TASKS, bugfix_prompt

STATIC = Path(__file__).with_name("static")


def default_slots(device) -> int:
    """Rows decoded together. On a CPU, 8: aggregate throughput still grows beyond it, but each
    client's time between tokens grows with every row (bench/serve_load.py); a GPU's step costs
    about the same for 64 rows as for one."""
    return 64 if str(device).startswith("cuda") else 8


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    suffix: str | None = None  # fill in the middle: the code after the hole
    model: str | None = None  # a served name; the base by default
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    stream: bool = False


class _BadField(Exception):
    def __init__(self, field: str | None, message: str, status: int = 400):
        self.field, self.message, self.status = field, message, status


def native_error(message: str, field: str | None = None) -> dict:
    return {"error": message, "field": field}


def error_for(path: str, message: str) -> dict:
    """A body-level error (no field) in the format of the API `path` belongs to."""
    return openai_api.error_body(message) if path.startswith("/v1/") else native_error(message)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, counted as they arrive
    (a missing or false Content-Length does not get past it). The body is read whole before the
    app runs, so the refusal is ours: an error raised while FastAPI reads a body becomes its 400."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: the app hears so
                break
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._reject(scope, send)
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": bytes(body), "more_body": False}
                break
        first = True

        async def replay():
            nonlocal first
            if first:
                first = False
                return message
            return await receive()  # after the body: a disconnect, which stops a generation

        await self.app(scope, replay, send)

    async def _reject(self, scope, send):
        body = json.dumps(error_for(scope["path"], f"request body exceeds {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def presets() -> dict:
    """Example prompts in each task's format, with the stop strings that end its answers."""
    buggy = 'def mean(values):\n    """The arithmetic mean of a non-empty list."""\n    return sum(values) / (len(values) - 1)\n'
    return {
        "free": {"label": "Free completion", "prompt": "import os\n\n\ndef ", "stop": []},
        "docstring": {"label": "Docstring → function",
                      "prompt": 'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same '
                                'backwards, ignoring case and spaces."""\n',
                      "stop": list(HUMANEVAL_STOP)},
        "bugfix": {"label": "Bug fix", "prompt": bugfix_prompt(buggy), "stop": list(TASKS["bugfix"].stop)},
        "infill": {"label": "Fill in the middle",
                   "prompt": 'def mean(values):\n    """The arithmetic mean of a non-empty list."""\n<FILL-HERE>\n\n'
                             'print(mean([1, 2, 3]))\n',
                   "stop": []},
    }


def create_app(model: GPT, tokenizer: Tokenizer, info: dict, limits: Limits = Limits(), *, name: str = "base",
               adapters: list[ServedModel] = (), row_adapters: RowAdapters | None = None, slots: int | None = None,
               graphs: bool = True, decode_thread: bool = True):
    """The server for `model`, served as `name`, and its `adapters` (attached to it with
    finetune.multi_lora.attach_adapters, which gave `row_adapters`). The decoding step is
    captured here, once, on a GPU. The scheduler (the returned app's `scheduler`) decodes on a
    thread of its own, or with `decode_thread=False` wherever its `run()` is called."""
    device = model.transformer.wte.weight.device
    slots = slots or default_slots(device)
    model.eval()
    engine = SlotEngine(model, slots, banned_ids(model, tokenizer, device), tokenizer.eot_id, graphs, row_adapters)
    served = [ServedModel(name, 0, model.config.fim), *adapters]
    serving = Serving(model, tokenizer, engine, served, limits)
    if decode_thread:
        serving.scheduler.start()

    @asynccontextmanager
    async def lifespan(app):
        yield
        serving.scheduler.close()

    app = FastAPI(title="CodeGPT", docs_url=None, redoc_url=None, lifespan=lifespan)
    block = model.config.block_size
    info = {**info, "tokenizer": tokenizer.name, "block_size": block, "fim": model.config.fim,
            "models": [asdict(m) for m in served], "slots": slots, "limits": asdict(limits),
            "graph_capture_s": engine.capture_seconds}
    app.include_router(openai_api.router(serving))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException):
        return JSONResponse(error_for(request.url.path, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(_BadField)
    async def bad_field(request: HTTPRequest, error: _BadField):
        message = f"{error.field}: {error.message}" if error.field else error.message
        return JSONResponse(native_error(message, error.field), status_code=error.status)

    @app.get("/health")
    async def health():  # as llama.cpp's server reports its slots
        idle = engine.free_rows
        return {"status": "ok", "slots_idle": idle, "slots_processing": slots - idle,
                "queued": serving.scheduler.waiting}

    @app.get("/info")
    async def get_info():
        return info

    @app.get("/presets")
    async def get_presets():
        return presets()

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    async def generate_request(http_request: HTTPRequest) -> GenerateRequest:
        try:
            document = await read_json(http_request)
        except BadBody as bad:
            raise _BadField(None, str(bad)) from None
        if not isinstance(document, dict):
            raise _BadField(None, "the body must be a JSON object")
        try:
            return GenerateRequest.model_validate(document)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            raise _BadField(field, first["msg"]) from None

    def sampling_of(body: GenerateRequest) -> Sampling:
        if body.max_new_tokens > limits.max_new_tokens:
            raise _BadField("max_new_tokens", f"at most {limits.max_new_tokens}, got {body.max_new_tokens}")
        sampling = Sampling(body.max_new_tokens, body.temperature, body.top_k, body.top_p, list(body.stop), body.seed)
        try:
            sampling.validate()  # what the schema's bounds cannot say: a seed torch takes, a usable temperature
        except BadOption as bad:
            raise _BadField(bad.field, bad.message) from None
        return sampling

    @app.post("/generate")
    async def post_generate(http_request: HTTPRequest):
        body = await generate_request(http_request)
        sampling = sampling_of(body)
        target = serving.models.get(body.model or name)
        if target is None:
            raise _BadField("model", f"no model {body.model!r} is served here (GET /v1/models lists them)", 404)
        ids = serving.prompt_ids(body.prompt, body.suffix, sampling.max_new_tokens)
        if len(ids) > limits.max_prompt_tokens:
            field = "prompt" if body.suffix is None else "suffix"
            raise _BadField(field, f"{len(ids)} tokens{' with the prompt' if body.suffix else ''}, at most "
                                   f"{limits.max_prompt_tokens}")
        warning = None if body.suffix is None or target.fim else not_trained_for_infilling(model)
        request = Request([Sequence(0, ids, sampling, target.adapter)])
        try:
            serving.scheduler.submit(request)
        except QueueFull:
            raise _BadField(None, f"the server's queue is full ({limits.max_queue} completions waiting); "
                                  "try again shortly", 429) from None
        if not body.stream:
            events = [event async for event in serving.events(request, http_request, watch=True)]
            if any(event.finish_reason == "error" for event in events):
                raise _BadField(None, "the server failed while decoding (its log says why)", 500)
            text = "".join(event.text for event in events)
            return {"text": text, "prompt_tokens": len(ids), **({"warning": warning} if warning else {})}

        async def sse():
            if warning:
                yield f"event: warning\ndata: {json.dumps({'warning': warning})}\n\n"
            async for event in serving.events(request, http_request, watch=False):
                if event.finish_reason == "error":
                    yield f"event: error\ndata: {json.dumps(native_error('the server failed while decoding'))}\n\n"
                    return
                if event.text:
                    yield f"data: {json.dumps({'text': event.text})}\n\n"
            yield f"event: done\ndata: {json.dumps({'prompt_tokens': len(ids)})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    wrapped = BodyLimit(app, limits.max_body_bytes)
    wrapped.scheduler = serving.scheduler
    return wrapped
