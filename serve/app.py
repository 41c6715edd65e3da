"""The inference server: a JSON API over one loaded model, and the page that uses it.

    GET  /          the page (serve/static/index.html)
    GET  /health    liveness
    GET  /info      model, parameters, adapter, tokenizer, device, limits
    GET  /presets   prompt formats of the tasks (free completion, docstring, bug fix)
    POST /generate  {"prompt", "suffix", "max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed",
                    "stream"}: streams server-sent events when "stream" is true, else returns the text.
                    With "suffix", the prompt is the code before a hole and the text its middle (fill in
                    the middle); a model not trained for it answers with a "warning".

Requests queue for the one model (a lock: one generation at a time, the rest wait); a client
that disconnects, streaming or not, stops its generation (one that gave up while queued never
starts one). Bad JSON and out-of-range values get 400 naming the field; bodies over the limit get
413, whether they declare their length or arrive chunked.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from codegpt.base.generate import not_trained_for_infilling, stream
from codegpt.base.sampling import BadOption, Sampling
from codegpt.base.model import GPT
from codegpt.base.tokenizer import Tokenizer
from codegpt.tasks.humaneval import STOP as HUMANEVAL_STOP
from codegpt.tasks.registry import TASKS, bugfix_prompt

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 768
    max_new_tokens: int = 512


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    suffix: str | None = None  # fill in the middle: the code after the hole
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    stream: bool = False


class _BadField(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


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
            return await self._reject(send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: the app hears so
                break
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._reject(send)
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

    async def _reject(self, send):
        body = json.dumps({"error": f"request body exceeds {self.max_bytes} bytes", "field": None}).encode()
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


def create_app(model: GPT, tokenizer: Tokenizer, info: dict, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="CodeGPT", docs_url=None, redoc_url=None)
    lock = asyncio.Lock()
    block = model.config.block_size
    info = {**info, "tokenizer": tokenizer.name, "block_size": block, "fim": model.config.fim, "limits": asdict(limits)}
    infill_warning = not_trained_for_infilling(model)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:] if p != "body") or None
        if first["type"] == "json_invalid":
            return JSONResponse({"error": f"invalid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                                 "field": None}, status_code=400)
        return JSONResponse({"error": f"{field}: {first['msg']}" if field else first["msg"], "field": field},
                            status_code=400)

    @app.exception_handler(_BadField)
    async def bad_field(request: Request, error: _BadField):
        return JSONResponse({"error": f"{error.field}: {error.message}", "field": error.field}, status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return info

    @app.get("/presets")
    async def get_presets():
        return presets()

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    def sampling_of(body: GenerateRequest) -> tuple[Sampling, int]:
        if body.max_new_tokens > limits.max_new_tokens:
            raise _BadField("max_new_tokens", f"at most {limits.max_new_tokens}, got {body.max_new_tokens}")
        prompt_tokens = len(tokenizer.encode(body.prompt)) + len(tokenizer.encode(body.suffix or ""))
        if prompt_tokens > limits.max_prompt_tokens:
            field = "prompt" if body.suffix is None else "suffix"
            raise _BadField(field, f"{prompt_tokens} tokens{' with the prompt' if body.suffix else ''}, at most "
                                   f"{limits.max_prompt_tokens}")
        sampling = Sampling(body.max_new_tokens, body.temperature, body.top_k, body.top_p, list(body.stop), body.seed)
        try:
            sampling.validate()  # what the schema's bounds cannot say: a seed torch takes, a usable temperature
        except BadOption as bad:
            raise _BadField(bad.field, bad.message) from None
        return sampling, prompt_tokens

    async def pieces(request: Request, prompt: str, suffix: str | None, sampling: Sampling):
        """The completion's pieces, decoded one step at a time while the client is still there:
        the model is held only for a client that waits for the answer."""
        async with lock:
            steps = stream(model, tokenizer, [prompt], sampling, [suffix])
            step = None
            try:
                while not await request.is_disconnected():
                    step = asyncio.ensure_future(run_in_threadpool(next, steps, None))
                    event = await asyncio.shield(step)
                    if event is None:
                        return
                    yield event[1]
            finally:
                # A cancelled client leaves one step running in its thread: let it finish before
                # the generator closes and the next request gets the model.
                if step is not None and not step.done():
                    await asyncio.wait([step])
                steps.close()

    @app.post("/generate")
    async def post_generate(body: GenerateRequest, request: Request):
        sampling, prompt_tokens = sampling_of(body)
        warning = infill_warning if body.suffix is not None else None
        if not body.stream:
            text = "".join([piece async for piece in pieces(request, body.prompt, body.suffix, sampling)])
            return {"text": text, "prompt_tokens": prompt_tokens, **({"warning": warning} if warning else {})}

        async def events():
            if warning:
                yield f"event: warning\ndata: {json.dumps({'warning': warning})}\n\n"
            async for piece in pieces(request, body.prompt, body.suffix, sampling):
                yield f"data: {json.dumps({'text': piece})}\n\n"
            if not await request.is_disconnected():
                yield f"event: done\ndata: {json.dumps({'prompt_tokens': prompt_tokens})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return BodyLimit(app, limits.max_body_bytes)
