"""The `ranktune` console script: one parser, one sub-command module per verb, one error policy.

Bad input exits with 2 and one message; a runtime failure with 1; a traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from ranktune.cli import (
    assets_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    merge_cmd,
    plan_cmd,
    saliency_cmd,
    train_cmd,
)
from ranktune.errors import RanktuneError
from ranktune.launch import exit_launched_process, joined_process_group

COMMANDS = (train_cmd, eval_cmd, generate_cmd, merge_cmd, export_cmd, inspect_cmd, saliency_cmd, plan_cmd, assets_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranktune", description="LoRA fine-tuning that learns where rank belongs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


# Logged by bitsandbytes when it is imported (PEFT imports it at start-up) on CPUs with AVX512-BF16 and without the
# optional `kernels` package: it falls back to its own kernel, and the user has nothing to act on.
_BITSANDBYTES_CPU_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


def _drop_bitsandbytes_kernel_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_BITSANDBYTES_CPU_KERNEL[1])


def _quiet_libraries() -> None:
    """Keeps the console to our own lines and the progress bars; set before transformers is imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger(_BITSANDBYTES_CPU_KERNEL[0]).addFilter(_drop_bitsandbytes_kernel_notice)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and e[0] != "-" for e in extra):
        args.overrides += extra  # `train CONFIG --resume key=value`: overrides may follow the flags too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug:
        _quiet_libraries()
    code = _run(args)
    if joined_process_group():  # under torchrun / accelerate launch: see ranktune.launch
        exit_launched_process(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """Runs the parsed command; returns its exit code, turning errors into one line on stderr."""
    try:
        return int(args.func(args) or 0)
    except RanktuneError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure we did not foresee: still one line, exit 1 (--debug shows the traceback)
        if args.debug:
            raise
        print(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
