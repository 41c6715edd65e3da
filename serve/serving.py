"""What the server's APIs share: the models it serves (a base and its adapters), its limits, the
scheduler, a JSON body read safely, and a request's events while its client waits for them."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.requests import Request as HTTPRequest

from codegpt.base.generate import prompt_ids
from codegpt.base.model import GPT
from codegpt.base.slots import SlotEngine
from codegpt.base.tokenizer import Tokenizer
from codegpt.serve.scheduler import Event, Request, Scheduler

# How often a waiting non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024
    max_prompt_tokens: int = 768
    max_new_tokens: int = 512
    max_queue: int = 64  # sequences waiting for a row; a request beyond it gets 429


@dataclass(frozen=True)
class ServedModel:
    """A name a request can give as its model: the base (adapter 0) or one of its adapters."""

    name: str
    adapter: int
    fim: bool  # trained for fill in the middle
    parent: str | None = None  # an adapter's base


class BadBody(Exception):
    pass


async def read_json(request: HTTPRequest) -> object:
    """The request's body as JSON, or BadBody saying why it is not: not UTF-8, not JSON, nested
    too deeply for the parser, or a number too long to convert."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadBody(f"the body is not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadBody("invalid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, or an integer over Python's 4,300 digits
        reason = "a number has too many digits" if "integer string conversion" in str(err) else str(err)
        raise BadBody(f"invalid JSON: {reason}") from None


class Serving:
    """The model, its served names and the scheduler that decodes for every request."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, engine: SlotEngine, models: list[ServedModel],
                 limits: Limits):
        self.model, self.tokenizer, self.engine, self.limits = model, tokenizer, engine, limits
        self.models = {served.name: served for served in models}
        self.scheduler = Scheduler(engine, tokenizer, limits.max_queue)

    def prompt_ids(self, prompt: str, suffix: str | None, max_new_tokens: int) -> list[int]:
        return prompt_ids(self.tokenizer, self.model.config.block_size, prompt, suffix, max_new_tokens)

    async def events(self, request: Request, http_request: HTTPRequest, watch: bool) -> AsyncIterator[Event]:
        """The request's events until each of its sequences has finished. With `watch`, a client
        that leaves is noticed while its answer is decoded (a streaming response notices when it
        writes). However it ends, what is still decoding or queued for it stops."""
        loop = asyncio.get_running_loop()
        remaining, checked = len(request.sequences), loop.time()
        try:
            while remaining:
                if watch and loop.time() - checked >= DISCONNECT_POLL_S:
                    if await http_request.is_disconnected():
                        return
                    checked = loop.time()
                try:
                    event = await asyncio.wait_for(request.events.get(), DISCONNECT_POLL_S if watch else None)
                except asyncio.TimeoutError:
                    continue
                remaining -= event.finish_reason is not None
                yield event
        finally:
            self.scheduler.cancel(request)
