"""Runs in the vLLM environment: next-token logits and greedy tokens of the base model with each PEFT adapter.

Usage: python vllm_worker.py REQUEST.json RESULT.npz
REQUEST: {"model": HF folder, "adapters": {label: PEFT folder or null}, "prompts": [[token ids]], "greedy": N,
          "max_lora_rank": R}
RESULT: for each label, `<label>/logits` (prompts, vocab) float32 and `<label>/tokens` (prompts, N) int64, or
`<label>/error` (a string array) when vLLM refused the adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, enable_lora=True, max_loras=1,
              max_lora_rank=request["max_lora_rank"], max_model_len=256, max_logprobs=-1,
              logprobs_mode="raw_logits", seed=0)  # fmt: skip
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=request["greedy"], logprobs=-1)
    arrays = {}
    for index, (label, adapter) in enumerate(request["adapters"].items(), start=1):
        lora = LoRARequest(label, index, adapter) if adapter else None
        try:
            outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        except Exception as error:  # the engine's own refusal, reported in the table
            arrays[f"{label}/error"] = np.array([f"{type(error).__name__}: {error}"])
            continue
        logits = np.full((len(prompts), vocab), np.nan, dtype=np.float32)
        tokens = []
        for row, output in enumerate(outputs):
            first = output.outputs[0].logprobs[0]  # {token id: Logprob} for the whole vocabulary at step 1
            for token_id, entry in first.items():
                logits[row, token_id] = entry.logprob
            tokens.append(list(output.outputs[0].token_ids))
        arrays[f"{label}/logits"], arrays[f"{label}/tokens"] = logits, np.array(tokens, dtype=np.int64)
    np.savez(sys.argv[2], **arrays)


if __name__ == "__main__":
    main()
