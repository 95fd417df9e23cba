"""Runs in the llama.cpp environment: next-token logits and greedy tokens of a GGUF base model with each adapter.

Usage: python llama_cpp_worker.py REQUEST.json RESULT.npz
REQUEST: {"model": base.gguf, "adapters": {label: adapter.gguf or null}, "prompts": [[token ids]], "greedy": N}
RESULT: for each label, `<label>/logits` (prompts, vocab) float32 and `<label>/tokens` (prompts, N) int64.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def run(model: str, adapter: str | None, prompts: list[list[int]], greedy: int) -> tuple[np.ndarray, np.ndarray]:
    # f32 KV cache (type 0): the default f16 cache alone moves logits by about 1e-2
    llm = Llama(model_path=model, lora_path=adapter, n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
                type_k=0, type_v=0, verbose=False)  # fmt: skip
    logits, tokens = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        logits.append(np.array(llm.scores[len(prompt) - 1], dtype=np.float32))
        generated = []
        for _ in range(greedy):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        tokens.append(generated)
    return np.stack(logits), np.array(tokens, dtype=np.int64)


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    arrays = {}
    for label, adapter in request["adapters"].items():
        logits, tokens = run(request["model"], adapter, request["prompts"], request["greedy"])
        arrays[f"{label}/logits"], arrays[f"{label}/tokens"] = logits, tokens
    np.savez(sys.argv[2], **arrays)


if __name__ == "__main__":
    main()
