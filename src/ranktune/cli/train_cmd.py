"""`ranktune train CONFIG [dotted.key=value ...]`."""

from __future__ import annotations

import argparse

from ranktune.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="fine-tune with LoRA from a YAML/TOML/JSON config")
    parser.add_argument("config", help="the run config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. lora.r=16")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in output_dir")
    parser.set_defaults(func=run)


def _change(before: dict | None, after: dict | None) -> str:
    if not before or not after:
        return ""
    keys = [k for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in after]
    return ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in keys)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from ranktune.training import train

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    change = _change(result.test_before, result.test_after)
    if change:
        print(f"test: {change}")
    elif result.test_after:
        print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in result.test_after.items() if isinstance(v, float)))
    print(f"adapter: {result.output_dir}")
    return 0
