"""`export_adapter`: an adapter folder written in one serving form, checked before anything is written.

Forms: `peft` (canonical: each module at its own rank), `uniform` (every module padded to the largest rank, and every
layer given every module type the adapter has, zeros where it had none), `gguf` (a llama.cpp adapter file). With
`max_rank`, modules above it are first replaced by their best approximation at that rank (`truncate`). The result is
staged and moved into place in one step: a failure leaves nothing at `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from ranktune.adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHORTCUTS_CONFIG, layer_of
from ranktune.errors import RuntimeFailure, UserInputError
from ranktune.files import STAGING_PREFIX, staged_folder
from ranktune.serving.engines import engine_warnings, vllm_max_lora_rank
from ranktune.serving.factors import AdapterFactors, read_factors
from ranktune.serving.forms import canonical_config, padded, peft_tensors, uniform_config
from ranktune.serving.truncate import Truncation, cap_ranks

Form = Literal["peft", "uniform", "gguf"]
FORMS: tuple[Form, ...] = ("peft", "uniform", "gguf")
EXPORT_INFO = "export.json"
# What travels from the adapter folder beside the exported adapter: the tokenizer and chat template.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")  # fmt: skip


@dataclass
class ExportResult:
    """What an export wrote and what a server needs to know about it."""

    path: Path
    form: Form
    ranks: dict[str, int]
    truncation: Truncation | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def largest_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def vllm_max_lora_rank(self) -> int | None:
        return vllm_max_lora_rank(self.largest_rank)

    def to_dict(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "form": self.form,
            "modules": len(self.ranks),
            "largest_rank": self.largest_rank,
            "vllm_max_lora_rank": self.vllm_max_lora_rank,
            "warnings": self.warnings,
        }
        if self.truncation is not None:
            truncation = self.truncation
            reduced = {
                name: {"rank_before": truncation.ranks_before[name], "relative_error": error}
                for name, error in truncation.errors.items()
            }
            info["truncation"] = {"total_relative_error": truncation.total_error, "modules": reduced}
        return info


def check_canonical(config: dict[str, Any], ranks: dict[str, int]) -> None:
    """The checks every written PEFT config passes: its target_modules are exactly the modules with factors (no
    rank-0 module targeted), and each module's own exact key is the one PEFT's first-match rule picks for it in
    rank_pattern and alpha_pattern.

    Raises:
        RuntimeFailure: a check fails (a ranktune bug: the config would load wrongly or not at all).
    """
    if sorted(config["target_modules"]) != sorted(ranks):
        raise RuntimeFailure("the exported target_modules differ from the modules that have factors")
    for pattern_name in ("rank_pattern", "alpha_pattern"):
        keys = list(config[pattern_name])
        for name in ranks:
            chosen = get_pattern_key(keys, name)
            if keys and chosen != name:
                raise RuntimeFailure(f"{pattern_name}: PEFT would give module '{name}' the entry of '{chosen}'")


def filled_layers(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every (layer, module type) pair the adapter has in some layer, in every layer it has: the missing ones as zero
    factors of `rank` shaped like the same type elsewhere (engines that stack layers then keep every type)."""
    by_kind: dict[str, tuple[int, str]] = {}  # module type: (a layer that has it, its name there)
    layers: set[int] = set()
    for name in modules:
        layer = layer_of(name)
        if layer is not None:
            by_kind.setdefault(name.split(f".{layer}.", 1)[1], (layer, name))
            layers.add(layer)
    result = dict(modules)
    for kind, (layer, example) in by_kind.items():
        lora_a, lora_b = modules[example]
        for other in sorted(layers):
            name = example.replace(f".{layer}.{kind}", f".{other}.{kind}")
            if name not in result:
                result[name] = (lora_a.new_zeros(rank, lora_a.shape[1]), lora_b.new_zeros(lora_b.shape[0], rank))
    return result


def _base_config(factors: AdapterFactors, base: str | Path | None) -> dict[str, Any]:
    """The base model's config: `base`'s or base_model_name_or_path's config.json read as JSON, or a hub id's from
    the local cache (no download, no code run).

    Raises:
        UserInputError: no config found there.
    """
    name = str(base or factors.config.get("base_model_name_or_path") or "")
    path = Path(name) / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserInputError(f"cannot read {path}: {error}") from None
    if name and not Path(name).exists():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
        except (OSError, ValueError):
            pass
    given = f"'{base}'" if base else f"base_model_name_or_path ('{name}')"
    raise UserInputError(
        f"the GGUF form needs the base model's config.json, and {given} has none: pass --base MODEL_DIR"
    )


def _check_out(adapter_dir: Path, out: Path, form: Form) -> None:
    if form == "gguf" and out.suffix != ".gguf":
        raise UserInputError(f"--out for the gguf form is a file ending in .gguf, got '{out}'")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserInputError(f"'{out}' already exists; choose a new --out or remove it first")
    if out.resolve() == adapter_dir.resolve():
        raise UserInputError(f"--out '{out}' is the adapter folder itself; choose a new folder")


def export_adapter(
    adapter_dir: str | Path, out: str | Path, form: Form = "peft", max_rank: int | None = None,
    base: str | Path | None = None,
) -> ExportResult:  # fmt: skip
    """Writes the adapter in `adapter_dir` to `out` in `form`.

    Args:
        adapter_dir: a PEFT LoRA adapter folder (ranktune's output_dir or any other).
        out: the folder to create (peft, uniform) or the .gguf file (gguf); it must not exist yet (or be empty).
        form: peft, uniform or gguf.
        max_rank: cap every module's rank at this by truncated SVD (reported per module).
        base: the base model folder, for the gguf form's architecture (default: base_model_name_or_path).

    Raises:
        UserInputError: a form, rank or path that cannot be honoured, or an adapter the form cannot hold.
    """
    if form not in FORMS:
        raise UserInputError(f"unknown form '{form}'; expected one of {', '.join(FORMS)}")
    if max_rank is not None and max_rank < 1:
        raise UserInputError(f"--max-rank must be at least 1, got {max_rank}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    _check_out(adapter_dir, out, form)
    factors = read_factors(adapter_dir)
    modules, truncation = factors.modules, None
    if max_rank is not None:
        modules, truncation = cap_ranks(modules, max_rank)
    ranks = {name: int(a.shape[0]) for name, (a, _) in modules.items()}
    if form == "uniform":  # every module at the largest rank, every layer given every module type
        top = max(ranks.values())
        modules = filled_layers(padded(modules, top), top)
        ranks = dict.fromkeys(modules, top)
    # The warnings are about what the written form holds.
    result = ExportResult(out, form, ranks, truncation, engine_warnings(form, ranks, bool(factors.other)))
    if (adapter_dir / SHORTCUTS_CONFIG).is_file():
        result.warnings.append(
            f"the adapter's shortcut connections ({SHORTCUTS_CONFIG}) are in no serving form: engines apply its "
            "LoRA modules only (`ranktune eval` / `generate` run the whole adapter)"
        )
    if form == "gguf":
        base_config = _base_config(factors, base)
        try:
            _write_gguf(factors, modules, out, base_config)
        except OSError as error:
            raise UserInputError(f"cannot write '{out}': {error.strerror or error}") from None
        return result
    if form == "uniform":
        config = uniform_config(factors.config, list(modules), max(ranks.values()))
    else:
        config = canonical_config(factors.config, ranks)
    check_canonical(config, ranks)
    try:
        _write_peft(factors, modules, config, result, out)
    except OSError as error:
        raise UserInputError(f"cannot write '{out}': {error.strerror or error}") from None
    return result


def _write_peft(
    factors: AdapterFactors,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict[str, Any],
    result: ExportResult,
    out: Path,
) -> None:
    adapter_dir = factors.folder
    with staged_folder(out, f"{STAGING_PREFIX}export-") as staging:
        save_file(peft_tensors(modules, factors.other, factors.dtype), str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})  # fmt: skip
        for name in _TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, staging / name)
        (staging / EXPORT_INFO).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_gguf(
    factors: AdapterFactors, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], out: Path, base: dict[str, Any]
) -> None:
    from ranktune.serving.gguf_form import gguf_tensors, write_gguf

    if factors.other:
        names = ", ".join(sorted(factors.other)[:3])
        raise UserInputError(
            f"a llama.cpp adapter holds LoRA factors only, and this adapter also trains whole tensors ({names}, ...): "
            "serve it with PEFT or vLLM, or merge it (`ranktune merge`) and convert the merged model"
        )
    tensors = gguf_tensors(modules, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}export-", suffix=".gguf", dir=out.parent)
    os.close(handle)
    try:
        write_gguf(Path(staging), tensors, base)
        os.chmod(staging, 0o644)  # mkstemp makes it private; a server running as another user reads it
        os.replace(staging, out)
    finally:
        Path(staging).unlink(missing_ok=True)


SERVING_FOLDER = "serving"


def check_gguf_base(architectures: list[str] | None) -> None:
    """Refuses, before training, a base model whose GGUF layout the gguf form does not know.

    Raises:
        UserInputError: naming the architecture and the alternative.
    """
    from ranktune.serving.gguf_form import ARCHITECTURES

    architecture = (architectures or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise UserInputError(
            f"export.formats: gguf knows the {', '.join(sorted(ARCHITECTURES))} layout, and the base model is "
            f"{architecture}; export the uniform form and convert it with llama.cpp's convert_lora_to_gguf.py"
        )


def write_serving_forms(output_dir: Path, forms: list[Form], max_rank: int | None) -> list[ExportResult]:
    """The serving forms of the adapter just written in output_dir, in output_dir/serving (peft/, uniform/,
    adapter.gguf). An earlier run's forms are removed first, whatever happens next: they belonged to another
    adapter. The new ones are staged and moved in together.

    Raises:
        UserInputError: a form could not be written (nothing is left at output_dir/serving then).
    """
    target = output_dir / SERVING_FOLDER
    doomed = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}serving-old-", dir=output_dir))
    results = []
    try:
        if target.exists():
            os.replace(target, doomed / "old")
        if forms:
            with staged_folder(doomed / "new", f"{STAGING_PREFIX}serving-") as staging:
                for form in dict.fromkeys(forms):
                    out = staging / ("adapter.gguf" if form == "gguf" else form)
                    results.append(export_adapter(output_dir, out, form, max_rank))
            os.replace(doomed / "new", target)
    finally:
        shutil.rmtree(doomed, ignore_errors=True)
    for result in results:
        result.path = target / result.path.name
    return results
