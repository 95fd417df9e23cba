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


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # no torch yet: most mistakes are reported at once
    from ranktune.console import launched_as_main
    from ranktune.evaluation import format_metrics
    from ranktune.training import train

    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if not launched_as_main():  # another process than the main one under torchrun: that one reports
        return 0
    if result.test_after:
        print(f"test: {format_metrics(result.test_after, result.test_before)}")
    print(f"adapter: {result.output_dir}")
    return 0
