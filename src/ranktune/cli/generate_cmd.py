"""`ranktune generate ADAPTER_DIR --prompt TEXT`: text from a causal-LM adapter."""

from __future__ import annotations

import argparse
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
    parser.set_defaults(func=run)


def use_chat_template(requested: bool | None, info: dict, tokenizer) -> bool:
    """Chat formatting when asked, else when the adapter was trained on chat messages."""
    if requested is not None:
        if requested and not tokenizer.chat_template:
            raise UserInputError("--chat: this tokenizer has no chat template")
        return requested
    return info.get("data_format") == "chat" and bool(tokenizer.chat_template)


def run(args: argparse.Namespace) -> int:
    read_adapter_config(Path(args.adapter_dir))  # refuse a wrong folder before importing torch
    import torch

    from ranktune.adapters.loading import load_adapter

    if args.max_new_tokens <= 0:
        raise UserInputError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    loaded = load_adapter(args.adapter_dir)
    if loaded.task != "causal_lm":
        raise UserInputError(f"{args.adapter_dir} is a {loaded.task} adapter; use `ranktune eval` for it")
    tokenizer = loaded.tokenizer
    if use_chat_template(args.chat, loaded.info, tokenizer):
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(loaded.model.device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = loaded.model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return 0
