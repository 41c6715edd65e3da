"""Start the inference server: the OpenAI completions API, CodeGPT's own JSON API and the web page.

    codegpt serve checkpoints/pretrain-cpu/final --adapter docstring=checkpoints/docstring-cpu/final \\
        [--adapter bugfix=PATH ...] [--served-model-name NAME] [--slots N] [--max-queue N] \\
        [--host 127.0.0.1] [--port 8000]

MODEL is a base or a merged model (any format `codegpt generate` reads), served under its path as
given, or --served-model-name; each --adapter NAME=PATH serves an adapter of that base beside it
under NAME (a bare PATH is named after its run directory), all decoded in the same batches. An
adapter trained on another base is refused at start; an adapter directory given as MODEL serves
its base and itself. Binds to 127.0.0.1 unless told otherwise; open http://127.0.0.1:8000/.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import threading
import time
from pathlib import Path

from accelerate import PartialState

from codegpt.base.convert import load_any
from codegpt.base.errors import ArgumentParser, UserError, cli_entry, positive_int
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import is_adapter, read_adapter_config
from codegpt.finetune.multi_lora import attach_adapters
from codegpt.serve.app import create_app, default_slots
from codegpt.serve.serving import Limits, ServedModel


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything is loaded: a port in use is one line, not a
    traceback after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"--port: {host}:{port} is already in use (another server?); choose another port") from None
        if err.errno == errno.EACCES:
            raise UserError(f"--port: no permission to listen on port {port} (ports below 1024 need root)") from None
        raise UserError(f"--host: cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def run_name(path: str) -> str:
    """checkpoints/docstring-tiny/final -> docstring-tiny: the run an adapter came from."""
    parts = Path(path).resolve().parts
    return parts[-2] if parts[-1] == "final" and len(parts) > 1 else parts[-1]


def adapter_args(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, _, path = value.partition("=") if "=" in value else (run_name(value), "=", value)
        if not name or not path:
            raise UserError(f"--adapter {value}: expected NAME=PATH")
        pairs.append((name, path))
    return pairs


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a base or merged model (directory or file), or an adapter directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter of the base to serve beside it under NAME (repeatable)")
    parser.add_argument("--served-model-name", help="the base's name in requests (default: MODEL as given)")
    parser.add_argument("--slots", type=positive_int, default=None,
                        help="sequences decoded together (default: 8 on a CPU, 64 on a GPU)")
    parser.add_argument("--max-queue", type=positive_int, default=Limits.max_queue,
                        help="completions waiting for a slot before requests get 429")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=positive_int, default=Limits.max_new_tokens)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=Limits.max_prompt_tokens)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port: must be in [1, 65535], got {args.port}")
    adapters = adapter_args(args.adapter)
    base_path = args.model
    if is_adapter(args.model):
        adapters.insert(0, (run_name(args.model), args.model))
        base_path = read_adapter_config(args.model)["base"]
        if not Path(base_path).exists():
            raise UserError(f"{base_path}: base model not found (the base {Path(args.model) / 'adapter.json'} names)")
    if not Path(base_path).exists():
        raise UserError(f"{base_path}: no such file or directory")
    for _, path in adapters:  # a bad adapter.json is named before the port is taken
        read_adapter_config(path)
    name = args.served_model_name or base_path
    names = [name, *(n for n, _ in adapters)]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter: two models are named {next(n for n in names if names.count(n) > 1)!r}")
    sock = listening_socket(args.host, args.port)
    try:
        device = PartialState().device
        model = load_any(base_path)
        row_adapters, documents = attach_adapters(model, [path for _, path in adapters]) if adapters else (None, [])
    except BaseException:
        sock.close()
        raise
    served = [ServedModel(n, i, document.get("fim") is True or model.config.fim, name)
              for i, ((n, _), document) in enumerate(zip(adapters, documents), start=1)]
    model.to(device)
    description = f"{base_path} ({model.num_params():,} parameters)"
    info = {"model": description, "parameters": model.num_params(), "adapters": dict(adapters), "device": str(device)}
    limits = Limits(max_new_tokens=args.max_new_tokens, max_queue=args.max_queue,
                    max_prompt_tokens=min(args.max_prompt_tokens, model.config.block_size - 1))
    app = create_app(model, Tokenizer(), info, limits, name=name, adapters=served, row_adapters=row_adapters,
                     slots=args.slots or default_slots(device), decode_thread=False)
    names = ", ".join(f"{n} ({path})" for n, path in adapters)
    print(f"serving {description} as {name}{' with adapters ' + names if adapters else ''} on "
          f"http://{args.host}:{args.port}/", flush=True)
    serve(app, sock)


def serve(app, sock: socket.socket) -> None:
    """HTTP on a second thread, decoding on this one. PyTorch's CPU kernels run fastest on the
    thread that loaded the model: a second thread's OpenMP team makes every kernel wait for its
    workers to wake (one request decoded 35% slower on a 2-core CPU)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not http.is_alive():
        raise UserError("the HTTP server stopped as it started (its log above says why)")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: app.scheduler.close())
    app.scheduler.run()
    server.should_exit = True
    http.join(timeout=30)


if __name__ == "__main__":
    main()
