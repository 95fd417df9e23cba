"""`ranktune merge ADAPTER_DIR --out DIR`: the base model with the adapter folded in, as a plain HF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ranktune.adapters.layout import SHORTCUTS_CONFIG, read_adapter_config
from ranktune.errors import UserInputError
from ranktune.files import staged_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="fold an adapter into its base model and save the full model")
    parser.add_argument("adapter_dir")
    parser.add_argument("--out", required=True, help="a new folder for the merged model")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code that the adapter's tokenizer or base model ships (only for folders you trust)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    read_adapter_config(Path(args.adapter_dir))  # refuse a wrong folder before importing torch
    if (Path(args.adapter_dir) / SHORTCUTS_CONFIG).is_file():
        raise UserInputError(
            f"'{args.adapter_dir}' has shortcut connections ({SHORTCUTS_CONFIG}), which cannot be merged into weights: "
            "residual1/residual2 add a low-rank map to the residual stream, where the model has no weight matrix, "
            "and shortcut1/shortcut2 carry activations from one point of the network to a later one (shortcut2 takes "
            "layer i-1's FFN input to layer i's attention output), a path no single weight sees as its input. Run "
            "the adapter with `ranktune eval` / `ranktune generate` (or `ranktune.load_adapter` in Python); a PEFT "
            "tool loads its LoRA part only"
        )
    from ranktune.adapters.loading import load_adapter

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"--out '{out}' exists and is not empty; choose a new folder")
    loaded = load_adapter(args.adapter_dir, quantize=False, trust_remote_code=args.trust_remote_code)
    print(f"merging {args.adapter_dir} into its base model", file=sys.stderr)
    merged = loaded.model.merge_and_unload()
    with staged_folder(out, f".{out.name}-") as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
    print(f"merged model: {out}")
    return 0
