"""`ranktune train` under FSDP2 on CPU, for the tests: `torchrun ... fsdp_train.py DIGEST_DIR ranktune-args...`.

accelerate applies FSDP only on GPUs and other accelerators; on CPU it silently trains a `training.fsdp` run as DDP
(which `ranktune train` reports). So that the tests run FSDP2's real code (`fully_shard` over gloo: DTensor base
weights, all-gathers in forward and backward, sharded checkpoints through torch.distributed.checkpoint), this
launcher makes accelerate's state say FSDP whenever an FSDP plugin was given; nothing else is changed.

After every optimizer step, each process appends a digest of its adapter tensors (every tensor whose name holds
`lora_` or `shortcut`, masks and gates included), the number of sharded (DTensor) tensors in the model and the names
of any sharded adapter tensor to DIGEST_DIR/digest-RANK.jsonl: the test compares the processes step by step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

_plugins: list = []
_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None:
        _plugins[:] = [fsdp_plugin]
    if _plugins and self.distributed_type == DistributedType.MULTI_CPU:  # also when the state is read again later
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugins[0]


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu


def _record_digests(digest_dir: Path) -> None:
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    from ranktune.training.trainer import RanktuneTrainer

    class Digest(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            tensors = [*model.named_parameters(), *model.named_buffers()]
            adapter = [(name, tensor) for name, tensor in tensors if "lora_" in name or "shortcut" in name]
            digest = {name: float(tensor.detach().double().sum()) for name, tensor in adapter}
            sharded = sum(isinstance(tensor, DTensor) for _, tensor in tensors)
            sharded_adapter = [name for name, tensor in adapter if isinstance(tensor, DTensor)]
            with (digest_dir / f"digest-{os.environ.get('RANK', '0')}.jsonl").open("a") as stream:
                stream.write(
                    json.dumps(
                        {
                            "step": state.global_step + 1,
                            "sharded": sharded,
                            "sharded_adapter": sharded_adapter,
                            "digest": digest,
                        }
                    )
                    + "\n"
                )

    original = RanktuneTrainer.__init__

    def with_digest(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Digest())

    RanktuneTrainer.__init__ = with_digest
    torch.set_num_threads(1)


if __name__ == "__main__":
    _record_digests(Path(sys.argv[1]))
    from ranktune.cli.main import main

    sys.exit(main(sys.argv[2:]))
