"""Start the inference web UI.

    codegpt serve --model checkpoints/pretrain-cpu/final [--adapter checkpoints/docstring-tiny/final]
                  [--host 127.0.0.1] [--port 8000]

Binds to 127.0.0.1 unless told otherwise; open http://127.0.0.1:8000/ in a browser.
"""

from __future__ import annotations

import argparse

from accelerate import PartialState

from codegpt.base.errors import ArgumentParser, UserError, cli_entry, positive_int
from codegpt.base.tokenizer import Tokenizer
from codegpt.finetune.adapter import load_for_inference
from codegpt.serve.app import Limits, create_app


@cli_entry
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or file, or an adapter directory")
    parser.add_argument("--adapter", help="LoRA adapter directory to put on the model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=positive_int, default=Limits.max_new_tokens)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=Limits.max_prompt_tokens)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port: must be in [1, 65535], got {args.port}")
    device = PartialState().device
    model, description = load_for_inference(args.model, args.adapter, device=device)
    info = {"model": description, "parameters": model.num_params(), "adapter": args.adapter, "device": str(device)}
    limits = Limits(max_new_tokens=args.max_new_tokens,
                    max_prompt_tokens=min(args.max_prompt_tokens, model.config.block_size - 1))
    print(f"serving {description} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(model, Tokenizer(), info, limits), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
