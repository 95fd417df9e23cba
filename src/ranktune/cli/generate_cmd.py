"""`ranktune generate ADAPTER_DIR --prompt TEXT`: text from a causal-LM adapter."""

from __future__ import annotations

import argparse
import inspect
import math
from pathlib import Path

from ranktune.adapters.layout import read_adapter_config
from ranktune.errors import UserInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a causal-LM adapter")
    parser.add_argument("adapter_dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap in the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code that the adapter's tokenizer or base model ships (only for folders you trust)",
    )
    parser.set_defaults(func=run)


def use_chat_template(requested: bool | None, info: dict, tokenizer) -> bool:
    """Chat formatting when asked, else when the adapter was trained on chat messages."""
    if requested is not None:
        if requested and not tokenizer.chat_template:
            raise UserInputError("--chat: this tokenizer has no chat template")
        return requested
    return info.get("data_format") == "chat" and bool(tokenizer.chat_template)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuses bad numbers before anything is loaded."""
    if args.max_new_tokens <= 0:
        raise UserInputError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserInputError(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")


def model_inputs(encoded: dict, model) -> dict:
    """The tokenizer's outputs that the model's forward takes.

    A tokenizer made for an encoder (BERT-style) also returns token_type_ids, which a causal LM without segment
    embeddings does not accept (generate refuses unknown inputs); a single prompt is all one segment, so leaving
    them out changes nothing. A model whose forward names them (GPT-2) gets them.
    """
    parameters = inspect.signature(model.get_base_model().forward).parameters
    return {key: value for key, value in encoded.items() if key != "token_type_ids" or key in parameters}


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    adapter_config = read_adapter_config(Path(args.adapter_dir))  # refuse a wrong folder before importing torch
    if adapter_config.get("task_type") == "SEQ_CLS":
        raise UserInputError(f"{args.adapter_dir} is a classification adapter; use `ranktune eval` for it")
    import torch

    from ranktune.adapters.loading import load_adapter

    loaded = load_adapter(args.adapter_dir, trust_remote_code=args.trust_remote_code)
    tokenizer = loaded.tokenizer
    if use_chat_template(args.chat, loaded.info, tokenizer):
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer(args.prompt, return_tensors="pt")
    inputs = model_inputs(encoded.to(loaded.model.device), loaded.model)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = loaded.model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return 0
