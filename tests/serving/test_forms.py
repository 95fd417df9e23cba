"""The PEFT forms: vanilla PEFT loads the canonical and the uniform export with the source adapter's logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ranktune.errors import RuntimeFailure, UserInputError
from ranktune.serving.export import check_canonical, export_adapter
from ranktune.serving.factors import module_scale, read_factors
from tests.serving.helpers import INPUT_IDS, heterogeneous_adapter, logits


def test_scales_follow_peft_first_match_rule():
    """The first key in file order that matches the name as a suffix at a dot boundary wins, as in PEFT."""
    config = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.q_proj": 6, "model.layers.0.mlp.down_proj": 6},
        "alpha_pattern": {"v_proj": 2.0, "model.layers.0.mlp.down_proj": 18.0},
    }
    assert module_scale(config, "model.layers.1.self_attn.q_proj") == (2, 4.0)  # the suffix key comes first
    assert module_scale(config, "model.layers.0.mlp.down_proj") == (6, 3.0)  # 18 / 6
    assert module_scale(config, "model.layers.0.self_attn.v_proj") == (4, 0.5)  # 2 / 4
    assert module_scale({**config, "use_rslora": True}, "model.layers.0.self_attn.k_proj") == (4, 4.0)  # 8 / √4


def test_an_adapter_whose_config_gives_another_rank_than_its_tensors_is_refused(tmp_path):
    """PEFT writes rank_pattern with its keys sorted: a suffix key that came first when the adapter was made (q_proj
    before model.layers.1.self_attn.q_proj) comes last in the file, so the adapter it saved does not load."""
    _, adapter = heterogeneous_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.1.self_attn.q_proj": 6, **config["rank_pattern"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = "'model.layers.1.self_attn.q_proj' has rank 6 by the config but its tensors have rank 2"
    with pytest.raises(UserInputError, match=re.escape(message)):
        read_factors(adapter)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("form", ["peft", "uniform"])
def test_export_loads_in_vanilla_peft_with_the_same_logits(tmp_path, form, rslora):
    model_dir, adapter = heterogeneous_adapter(tmp_path, rslora=rslora)
    out = tmp_path / form
    result = export_adapter(adapter, out, form)
    expected = logits(model_dir, adapter)
    assert (expected - logits(model_dir, None)).abs().max() > 1e-2  # the adapter does change the logits
    torch.testing.assert_close(logits(model_dir, out), expected, rtol=0, atol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 6
    if form == "uniform":
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        shapes = {key: t.shape for key, t in load_file(str(out / "adapter_model.safetensors")).items()}
        assert {s[0] for k, s in shapes.items() if "lora_A" in k} == {6}
        assert {s[1] for k, s in shapes.items() if "lora_B" in k} == {6}
        assert set(result.ranks.values()) == {6}
    else:
        assert config["rank_pattern"] == config["alpha_pattern"] == read_factors(adapter).ranks
    assert json.loads((out / "export.json").read_text())["vllm_max_lora_rank"] == 8
    assert (out / "tokenizer_config.json").read_bytes() == (adapter / "tokenizer_config.json").read_bytes()


def test_uniform_form_gives_every_layer_every_module_type(tmp_path):
    """Layer 1 has no down_proj: the uniform form adds a zero one, so layer-stacking engines keep the type."""
    model_dir, adapter = heterogeneous_adapter(tmp_path, skip_layer_1_down=True)
    assert "model.layers.1.mlp.down_proj" not in read_factors(adapter).modules
    result = export_adapter(adapter, tmp_path / "uniform", "uniform")
    tensors = load_file(str(tmp_path / "uniform" / "adapter_model.safetensors"))
    filled = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert filled.shape[1] == 6 and filled.abs().sum() == 0
    assert "model.layers.1.mlp.down_proj" in result.ranks
    torch.testing.assert_close(logits(model_dir, tmp_path / "uniform"), logits(model_dir, adapter), rtol=0, atol=1e-5)
    peft_result = export_adapter(adapter, tmp_path / "peft", "peft")
    assert any("TGI and LoRAX drop a module type" in w and "mlp.down_proj" in w for w in peft_result.warnings)


def test_check_canonical_catches_a_shadowing_key_and_a_rank_zero_target():
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 4}
    good = {"target_modules": sorted(ranks), "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks)}
    check_canonical(good, ranks)
    shadowed = {**good, "rank_pattern": {"q_proj": 2, **ranks}}
    with pytest.raises(
        RuntimeFailure, match=re.escape("PEFT would give module 'model.layers.0.self_attn.q_proj' the entry")
    ):
        check_canonical(shadowed, ranks)
    with pytest.raises(RuntimeFailure, match="target_modules differ"):
        check_canonical({**good, "target_modules": [*sorted(ranks), "model.layers.2.self_attn.q_proj"]}, ranks)


def test_nothing_is_written_over_an_existing_folder_or_for_a_dora_adapter(tmp_path):
    _, adapter = heterogeneous_adapter(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already exists"):
        export_adapter(adapter, tmp_path / "taken", "uniform")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserInputError, match="DoRA"):
        export_adapter(adapter, tmp_path / "dora", "peft")
    assert not (tmp_path / "dora").exists()


def test_peft_linear_merge_takes_uniform_forms_of_different_adapters_and_not_their_own_ranks(tmp_path):
    """PEFT's add_weighted_adapter 'linear' mode checks only the global r, then adds A and B module by module: two
    adapters with the same largest rank but other per-module ranks fail in their canonical form and merge in the
    uniform one. 'linear' scales A and B by √weight each and sums them, so one adapter's uniform form twice, at
    weights 1/4 and 1/4, gives that adapter again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, first = heterogeneous_adapter(tmp_path)
    _, second = heterogeneous_adapter(tmp_path, rank_pattern={"k_proj": 2, "model.layers.1.mlp.down_proj": 6})
    for adapter in (first, second):
        for form in ("peft", "uniform"):
            export_adapter(adapter, tmp_path / f"{adapter.name}-{form}", form)

    def merged(form: str, names: tuple[str, str]):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model = PeftModel.from_pretrained(model, tmp_path / f"{names[0]}-{form}", "a")
        model.load_adapter(tmp_path / f"{names[1]}-{form}", "b")
        model.add_weighted_adapter(["a", "b"], [0.25, 0.25], "mean", combination_type="linear")
        model.set_adapter("mean")
        with torch.no_grad():
            return model.eval()(input_ids=INPUT_IDS).logits

    torch.testing.assert_close(merged("uniform", (first.name, first.name)), logits(model_dir, first), rtol=0, atol=1e-5)
    assert merged("uniform", (first.name, second.name)).isfinite().all()
    with pytest.raises(RuntimeError, match="size"):
        merged("peft", (first.name, second.name))


@pytest.mark.parametrize("form", ["uniform", "gguf"])
def test_a_write_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch, form):
    _, adapter = heterogeneous_adapter(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    target = "ranktune.serving.gguf_form.write_gguf" if form == "gguf" else "ranktune.serving.export.save_file"
    monkeypatch.setattr(target, full_disk)
    out = tmp_path / ("a.gguf" if form == "gguf" else "served")
    with pytest.raises(UserInputError, match=r"cannot write .*No space left on device"):
        export_adapter(adapter, out, form, base=tmp_path / "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no output, no staging left
