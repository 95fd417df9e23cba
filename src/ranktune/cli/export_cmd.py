"""`ranktune export ADAPTER_DIR --out PATH --format peft|uniform|gguf [--max-rank N] [--base MODEL_DIR]`."""

from __future__ import annotations

import argparse
import sys

FORMS = ("peft", "uniform", "gguf")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write an adapter in a form an inference engine reads (PEFT, uniform ranks, llama.cpp GGUF)"
    )
    parser.add_argument("adapter_dir")
    parser.add_argument("--out", required=True, help="a new folder (peft, uniform) or a .gguf file (gguf)")
    parser.add_argument(
        "--format",
        choices=FORMS,
        default="peft",
        help="peft: each module at its own rank (vLLM, PEFT); uniform: every module padded to the largest rank "
        "(SGLang, TGI, LoRAX, llama.cpp's converter, PEFT hotswap); gguf: a llama.cpp adapter (default: peft)",
    )
    parser.add_argument(
        "--max-rank", type=int, metavar="N", help="reduce modules above rank N to their best rank-N approximation"
    )
    parser.add_argument("--base", metavar="MODEL_DIR", help="the base model folder (gguf; default: the adapter's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ranktune.serving.export import export_adapter

    result = export_adapter(args.adapter_dir, args.out, args.format, args.max_rank, args.base)
    if result.truncation is not None and result.truncation.errors:
        truncation = result.truncation
        print(f"reduced {len(truncation.errors)} modules to rank {args.max_rank} (relative error of ΔW):")
        for name, error in sorted(truncation.errors.items(), key=lambda item: -item[1]):
            print(f"  {name}: rank {truncation.ranks_before[name]} -> {args.max_rank}, error {error:.4f}")
        print(f"  whole adapter: error {truncation.total_error:.4f}")
    elif result.truncation is not None:
        print(f"every module is at rank {args.max_rank} or below: nothing reduced")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    serving = result.vllm_max_lora_rank
    vllm = f"vLLM: --max-lora-rank {serving}" if serving else "vLLM cannot serve it"
    print(f"{args.format} form: {len(result.ranks)} modules, largest rank {result.largest_rank} ({vllm})")
    print(f"written: {result.path}")
    return 0
