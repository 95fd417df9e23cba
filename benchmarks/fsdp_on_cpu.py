"""`ranktune train` under FSDP2 on CPU: `torchrun ... benchmarks/fsdp_on_cpu.py OUT_DIR ranktune-args...`.

Used by the FSDP tests (tests/distributed/test_fsdp.py) and the FSDP step-time benchmark
(benchmarks/fsdp_overhead.py).

accelerate applies FSDP only on GPUs and other accelerators; on CPU it silently trains a `training.fsdp` run as DDP
(which `ranktune train` reports). So that the tests run FSDP2's real code (`fully_shard` over gloo: DTensor base
weights, all-gathers in forward and backward, sharded checkpoints through torch.distributed.checkpoint), this
launcher makes accelerate's state say FSDP whenever an FSDP plugin was given; nothing else is changed.

After every optimizer step, each process appends a digest of its adapter tensors (every tensor whose name holds
`lora_` or `shortcut`, masks and gates included), the number of sharded (DTensor) tensors in the model and the names
of any sharded adapter tensor to OUT_DIR/digest-RANK.jsonl: the test compares the processes step by step. With
RANKTUNE_STEP_TIMES=1 it writes each optimizer step's wall time to OUT_DIR/steps-RANK.json instead (no digests).
With RANKTUNE_SIGTERM_AT=RANK:STEP, process RANK sends itself a SIGTERM as optimizer step STEP begins (a signal
that reaches one process only).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` from the repository

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

    from benchmarks.common import StepTimer
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
    timing = os.environ.get("RANKTUNE_STEP_TIMES") == "1"

    signal_at = os.environ.get("RANKTUNE_SIGTERM_AT")  # "RANK:STEP": that process gets a SIGTERM as STEP begins

    def with_digest(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StepTimes() if timing else Digest())
        if signal_at:
            self.add_callback(SignalOneProcess())

    class SignalOneProcess(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rank, step = (int(part) for part in signal_at.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and state.global_step + 1 == step:
                os.kill(os.getpid(), signal.SIGTERM)

    class StepTimes(StepTimer):
        def on_train_end(self, args, state, control, **kwargs):
            (digest_dir / f"steps-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(self.times))

    RanktuneTrainer.__init__ = with_digest
    torch.set_num_threads(1)


if __name__ == "__main__":
    _record_digests(Path(sys.argv[1]))
    from ranktune.cli.main import main

    sys.exit(main(sys.argv[2:]))
