"""load_adapter runs code shipped in a folder only when its caller asks, whatever the folder's ranktune.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ranktune.adapters.loading import load_adapter
from ranktune.errors import UserInputError
from tests.conftest import build_tokenizer


@pytest.fixture
def hostile_adapter(make_model_dir, tmp_path) -> tuple[Path, Path]:
    """A causal-LM adapter whose ranktune.json sets trust_remote_code and whose tokenizer names code in the folder;
    returns the folder and the file that code would create."""
    base = make_model_dir("llama")
    folder, marker = tmp_path / "adapter", tmp_path / "code-ran"
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    (folder / "ranktune.json").write_text(json.dumps({"config": {"model": {"trust_remote_code": True}}}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder, marker


def test_folder_cannot_grant_itself_trust(hostile_adapter):
    folder, marker = hostile_adapter
    with pytest.raises(UserInputError, match=r"auto_map.*trust_remote_code=True"):
        load_adapter(folder)
    assert not marker.exists()


def test_caller_can_trust_the_folder(hostile_adapter):
    folder, marker = hostile_adapter
    loaded = load_adapter(folder, trust_remote_code=True)
    assert marker.exists() and loaded.task == "causal_lm"
