"""The OpenAI completions API: `GET /v1/models` and `POST /v1/completions`, so that the official
`openai` client, editor plug-ins and the tools built on them talk to CodeGPT as they talk to
OpenAI, vLLM or llama.cpp's server.

`model` is the base's name or an adapter's (`GET /v1/models` lists them, as vLLM lists its LoRA
modules); `prompt` a string, a list of them, or token ids; `suffix` makes each prompt a hole to
fill in the middle; `n` samples per prompt, choice i * n + j being prompt i's j-th, drawn with
seed + j; `stream` sends server-sent chunks in OpenAI's shape, then `data: [DONE]`. Where OpenAI
leaves things open this follows vLLM: `max_tokens` null means up to the server's cap, and the
extensions `top_k` and `min_tokens` (no <|endoftext|> before that many tokens) are accepted.
Fields OpenAI defines for features served nowhere here (echo, logprobs, best_of, penalties,
logit_bias) are accepted at their neutral values and refused otherwise; unknown fields are refused
as OpenAI refuses them. Errors use OpenAI's schema, {"error": {"message", "type", "param",
"code"}}: 400 naming the param, 404 for an unknown model, 429 when the queue is full.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from codegpt.base.sampling import BadOption, Sampling
from codegpt.serve.scheduler import QueueFull, Request, Sequence
from codegpt.serve.serving import BadBody, Serving, read_json

MAX_STOP = 16
MAX_N = 128


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error_body(error.message, error.param, error.kind, error.code), status_code=error.status,
                        headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Defined by OpenAI, served at their neutral values only.
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (llama.cpp's server takes top_k too).
    top_k: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)


def _unsupported(body: CompletionRequest) -> str | None:
    neutral = {"echo": False, "logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    for name, value in neutral.items():
        if getattr(body, name) != value:
            return name
    if body.best_of not in (None, 1):
        return "best_of"
    if body.logit_bias:
        return "logit_bias"
    return None


def parse(document: object) -> CompletionRequest:
    if not isinstance(document, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    try:
        body = CompletionRequest.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise OpenAIError(400, f"Unrecognized request argument supplied: {param}", param) from None
        if first["type"] == "missing":
            raise OpenAIError(400, f"{param}: a required field is missing", param) from None
        if param == "prompt":
            raise OpenAIError(400, "prompt: must be a string, a list of strings, a list of token ids or a list of "
                                   "lists of token ids", param) from None
        raise OpenAIError(400, f"{param}: {first['msg']}", param) from None
    if (name := _unsupported(body)) is not None:
        raise OpenAIError(400, f"{name}: not supported by this server (leave it out)", name)
    return body


class Completions:
    """/v1/completions over `serving`: validates, queues a request's sequences, shapes the answer."""

    def __init__(self, serving: Serving):
        self.serving = serving

    def sampling_of(self, body: CompletionRequest) -> Sampling:
        cap = self.serving.limits.max_new_tokens
        if body.max_tokens is not None and body.max_tokens > cap:
            raise OpenAIError(400, f"max_tokens: at most {cap}, got {body.max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP:
            raise OpenAIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
        top_p = None if body.top_p in (None, 1) else body.top_p
        sampling = Sampling(body.max_tokens or cap, 1.0 if body.temperature is None else body.temperature,
                            body.top_k, top_p, stop, body.seed)
        try:
            sampling.validate()  # what the schema cannot say: a usable temperature, a seed torch takes
        except BadOption as bad:
            param = "max_tokens" if bad.field == "max_new_tokens" else bad.field
            raise OpenAIError(400, f"{param}: {bad.message}", param) from None
        return sampling

    def prompts_of(self, body: CompletionRequest, sampling: Sampling) -> list[list[int]]:
        """Each prompt's ids, a hole's PSM prompt with a suffix."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIError(400, "prompt: the list is empty", "prompt")
        tokenizer, limit = self.serving.tokenizer, self.serving.limits.max_prompt_tokens
        vocab = self.serving.model.config.vocab_size
        encoded = []
        for p in prompts:
            if not isinstance(p, str):
                if bad := [i for i in p if not (tokenizer.is_valid(i) and i < vocab)]:
                    raise OpenAIError(400, f"prompt: {bad[0]} is not a token id of {tokenizer.name}", "prompt")
                if body.suffix is None:
                    encoded.append(list(p))
                    continue
                p = tokenizer.decode(p)
            ids = self.serving.prompt_ids(p, body.suffix, sampling.max_new_tokens)
            if len(ids) > limit:
                param = "prompt" if body.suffix is None else "suffix"
                raise OpenAIError(400, f"{param}: {len(ids)} tokens{' with the prompt' if body.suffix else ''}, "
                                       f"at most {limit}", param)
            encoded.append(ids)
        return encoded

    async def create(self, http_request: HTTPRequest):
        try:
            document = await read_json(http_request)
        except BadBody as bad:
            raise OpenAIError(400, str(bad)) from None
        body = parse(document)
        served = self.serving.models.get(body.model)
        if served is None:
            raise OpenAIError(404, f"The model `{body.model}` does not exist (GET /v1/models lists the models served "
                                   "here)", "model", code="model_not_found")
        sampling = self.sampling_of(body)
        prompts = self.prompts_of(body, sampling)
        count = len(prompts) * body.n
        if count > self.serving.limits.max_queue:
            raise OpenAIError(400, f"n: {len(prompts)} prompt(s) x n={body.n} is {count} completions; this server "
                                   f"queues at most {self.serving.limits.max_queue}", "n")
        request = Request([Sequence(i * body.n + j, ids, sampling.nth(j), served.adapter, body.min_tokens)
                           for i, ids in enumerate(prompts) for j in range(body.n)])
        try:
            self.serving.scheduler.submit(request)
        except QueueFull:
            raise OpenAIError(429, f"the server's queue is full ({self.serving.limits.max_queue} completions "
                                   "waiting); try again shortly", kind="rate_limit_error",
                              code="rate_limit_exceeded") from None
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": body.model}
        usage = {"prompt_tokens": sum(len(ids) for ids in prompts), "completion_tokens": 0}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._chunks(request, http_request, header, usage, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * count, [None] * count
        async for event in self.serving.events(request, http_request, watch=True):
            texts[event.index] += event.text if event.finish_reason != "error" else ""
            if event.finish_reason is not None:
                reasons[event.index] = event.finish_reason
                usage["completion_tokens"] += event.tokens
        if "error" in reasons:
            raise OpenAIError(500, "the server failed while decoding (its log says why)", kind="server_error")
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {**header, "choices": choices, "usage": with_total(usage)}

    async def _chunks(self, request, http_request, header, usage, include_usage):
        def chunk(payload: dict) -> str:
            return f"data: {json.dumps({**header, **payload})}\n\n"

        async for event in self.serving.events(request, http_request, watch=False):
            if event.finish_reason == "error":
                yield f"data: {json.dumps(error_body('the server failed while decoding', kind='server_error'))}\n\n"
                return
            usage["completion_tokens"] += event.tokens
            if event.text or event.finish_reason:
                yield chunk({"choices": [{"text": event.text, "index": event.index, "logprobs": None,
                                          "finish_reason": event.finish_reason}]})
        if include_usage:
            yield chunk({"choices": [], "usage": with_total(usage)})
        yield "data: [DONE]\n\n"


def with_total(usage: dict) -> dict:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def router(serving: Serving) -> APIRouter:
    routes = APIRouter(prefix="/v1")
    completions = Completions(serving)

    @routes.get("/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": created, "owned_by": "codegpt", "root": m.name,
             "parent": m.parent, "max_model_len": serving.model.config.block_size, "fim": m.fim}
            for m in serving.models.values()]}

    @routes.post("/completions")
    async def create(http_request: HTTPRequest):
        try:
            return await completions.create(http_request)
        except OpenAIError as error:
            return error_response(error)

    return routes
