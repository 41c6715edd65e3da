"""Convert checkpoints between CodeGPT, nanoGPT / build-nanogpt and Hugging Face GPT-2.

    python -m base.convert ckpt.pt checkpoints/imported          # nanoGPT .pt -> CodeGPT
    python -m base.convert hf-gpt2-dir checkpoints/imported      # HF GPT-2 directory -> CodeGPT
    python -m base.convert checkpoints/run/final hf-out --to hf  # CodeGPT -> HF GPT-2 (from_pretrained loads it)
"""

from __future__ import annotations

import argparse

from base.checkpoint import detect_format, export_hf, load_any, provenance, save_model
from base.errors import ArgumentParser, cli_entry, positive_int


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="CodeGPT directory, nanoGPT .pt file, or Hugging Face GPT-2 directory")
    parser.add_argument("dest", help="output directory")
    parser.add_argument("--to", choices=("codegpt", "hf"), default="codegpt")
    parser.add_argument("--n-head", type=positive_int, help="heads, for a .pt file whose config does not say")
    parser.add_argument("--activation", choices=("gelu_tanh", "gelu"),
                        help="override the GELU form read from a .pt file (nanoGPT: gelu, build-nanogpt: gelu_tanh)")
    args = parser.parse_args(argv)
    kind = detect_format(args.source)
    model = load_any(args.source, n_head=args.n_head, activation=args.activation)
    if args.to == "hf":
        export_hf(model, args.dest)
        if model.config.active_vocab is not None:
            print(f"note: {args.source} was trained over {model.config.active_vocab:,} of its {model.config.vocab_size:,} "
                  "ids; GPT-2 has no such restriction, so the exported model gives the others small probabilities "
                  "(ban them when sampling: they never occurred in its training data)")
    else:
        save_model(args.dest, model, meta=provenance(source=str(args.source), source_format=kind))
    print(f"{args.source} ({kind}) -> {args.dest} ({args.to}): {model.num_params():,} parameters")


if __name__ == "__main__":
    main()
