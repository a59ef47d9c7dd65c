"""`finetune train --num-processes N / --accelerate-config FILE`: start the same command under accelerate.

All distributed work is accelerate's (DDP, FSDP, DeepSpeed); this only builds the `accelerate launch`
command line a user would otherwise type, and runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError


def launch_command(train_args: list[str], num_processes: Optional[int], config_file: Optional[str]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        if not Path(config_file).is_file():
            raise FinetuneError(
                f"accelerate config '{config_file}' does not exist; see configs/accelerate/ for ready ones"
            )
        command += ["--config_file", config_file]
    else:
        # Defaults that silence accelerate's "values not passed" notice; precision is set by finetune itself.
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes is not None:
        if num_processes < 1:
            raise FinetuneError("--num-processes must be at least 1")
        command += ["--num_processes", str(num_processes)]
        if num_processes > 1 and not config_file:
            command.append("--multi_gpu")  # one process per GPU (gloo processes on a CPU-only machine)
    return [*command, "-m", "finetune", *train_args]


def launch_training(train_args: list[str], num_processes: Optional[int], config_file: Optional[str]) -> int:
    command = launch_command(train_args, num_processes, config_file)
    print("launching: accelerate launch " + " ".join(command[3:]), file=sys.stderr, flush=True)
    return subprocess.call(command)
