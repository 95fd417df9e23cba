"""Leaving a torchrun / accelerate launch: the end of a process that joined a torch.distributed group.

gloo runs each process group's collectives on its own C++ worker threads. A worker that drops the last reference to
a tensor Python also knew must take the GIL to free it. If that happens once the interpreter has begun to shut down,
CPython ends the thread inside a C++ destructor and the process aborts (SIGABRT, "terminate called without an active
exception"); torchrun then reports the run as failed although every file was written. `destroy_process_group` does
not prevent it while anything (FSDP2's device mesh, accelerate's state) still holds the group, so a process that
joined one ends here without the interpreter's shutdown: its output is flushed and its exit handlers run first.
"""

from __future__ import annotations

import atexit
import os
import sys


def joined_process_group() -> bool:
    """Whether this process is in an initialised torch.distributed group (torch is not imported to find out)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def exit_launched_process(code: int) -> None:
    """Leaves the process group and ends the process with `code`, skipping the interpreter's shutdown; never returns.

    Standard output and error are flushed and the exit handlers (`atexit`: logging's flush, temporary folders) run
    before the process ends, so nothing written is lost.
    """
    import torch.distributed as dist

    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
