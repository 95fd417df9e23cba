"""The GGUF form: read back with the gguf package, its tensors give each module's update as llama.cpp lays it out,
and its metadata makes llama.cpp apply every module at scale 1."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from ranktune.errors import UserInputError
from ranktune.serving.export import export_adapter
from ranktune.serving.factors import read_factors
from ranktune.serving.gguf_form import llama_permute
from tests.conftest import save_tiny_model
from tests.serving.helpers import heterogeneous_adapter


def test_llama_permute_by_hand():
    """One head of 4 rows: (2, 2) halves [[0, 1], [2, 3]] swapped to pairs [[0, 2], [1, 3]]: rows 0, 2, 1, 3."""
    rows = torch.arange(4.0)[:, None]
    assert llama_permute(rows, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    two_heads = torch.arange(8.0)[:, None]
    assert llama_permute(two_heads, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]


def test_gguf_reads_back_with_every_update_and_alpha_zero(tmp_path):
    model_dir, adapter = heterogeneous_adapter(tmp_path)
    export_adapter(adapter, tmp_path / "adapter.gguf", "gguf")
    reader = gguf.GGUFReader(str(tmp_path / "adapter.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    factors = read_factors(adapter)
    config = json.loads((model_dir / "config.json").read_text())
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "down_proj": "ffn_down"}
    assert len(tensors) == 2 * len(factors.modules)
    for name, (lora_a, lora_b) in factors.modules.items():
        layer, kind = name.split(".")[2], name.rsplit(".", 1)[-1]
        stem = f"blk.{layer}.{kinds[kind]}.weight"
        gguf_a, gguf_b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
        assert gguf_a.shape == lora_a.shape and gguf_b.shape == lora_b.shape  # (k, in), (out, k)
        update = lora_b @ lora_a  # the canonical ΔW, (out, in)
        if kind == "q_proj":
            update = llama_permute(update, config["num_attention_heads"])
        elif kind == "k_proj":
            update = llama_permute(update, config["num_key_value_heads"])
        torch.testing.assert_close(gguf_b @ gguf_a, update, rtol=0, atol=1e-6)


def test_gguf_refuses_an_unknown_architecture_and_a_classifier_head(tmp_path):
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2")
    _, adapter = heterogeneous_adapter(tmp_path)
    with pytest.raises(UserInputError, match="knows the LlamaForCausalLM layout, and the base model is GPT2LMHead"):
        export_adapter(adapter, tmp_path / "a.gguf", "gguf", base=gpt2)
    with pytest.raises(UserInputError, match=r"a file ending in \.gguf"):
        export_adapter(adapter, tmp_path / "a-folder", "gguf")
    assert not (tmp_path / "a.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ranktune-staging")]
