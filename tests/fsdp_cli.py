"""`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_cli.py train ...`: finetune's CLI under
accelerate's FSDP2 on CPU processes (gloo).

accelerate selects FSDP only for GPU process groups and leaves a CPU group as plain MULTI_CPU;
FSDP2 itself (fully_shard) runs on CPU. So this lifts that one gate — the state says FSDP2 with
a full-shard plugin — and everything else (preparing the model, the state dicts, our training
loop and checkpoints) runs as it would on GPUs. Test-only: the product never does this.
"""

import sys

import accelerate
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_original_init = accelerate.Accelerator.__init__


def _init_with_fsdp2(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        auto_wrap_policy="transformer_based_wrap",
        cpu_ram_efficient_loading=False,
    )


accelerate.Accelerator.__init__ = _init_with_fsdp2
accelerate.Accelerator.distributed_type = property(lambda self: DistributedType.FSDP)
AcceleratorState.is_fsdp2 = property(lambda self: True)

if __name__ == "__main__":
    from finetune.cli import main

    sys.exit(main())
