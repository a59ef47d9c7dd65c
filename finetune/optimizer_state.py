"""Optimizer state in checkpoints: one full, name-keyed file that resumes under any process layout.

`optimizer.state_dict()` keys moments by parameter position and, under FSDP, holds only this
rank's shard, so rank 0's copy is not the whole state. torch.distributed.checkpoint's
`get_optimizer_state_dict(full_state_dict=True)` gathers the shards into full tensors keyed by
parameter name (collective: every rank calls it; only rank 0 keeps the result, on the CPU), and
`set_optimizer_state_dict` re-shards that file on load, reading it on rank 0 and broadcasting.
The same file therefore resumes a run on one process, under DDP or under FSDP, whatever layout
wrote it. Gathering costs rank 0 host memory for the whole optimizer state (2x the fp32 weights for
AdamW); that is the price of a plain, portable file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT = "full-by-name"  # state.json's "optimizer_format"; checkpoints without it hold optimizer.state_dict()


def _options(distributed: bool, for_load: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if for_load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict:
    """The whole optimizer state keyed by parameter name; call on every rank, save rank 0's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=_options(distributed, for_load=False))


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state, distributed: bool, is_main: bool) -> None:
    """Load a gathered state into this rank's optimizer (its shard under FSDP); call on every rank.

    Under several processes only rank 0 needs `state` (the others pass None): it is broadcast.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if distributed and not is_main:
        state = {}
    set_optimizer_state_dict(
        model, _torch_optimizer(optimizer), optim_state_dict=state, options=_options(distributed, for_load=True)
    )


def _map(state: dict, rename, resize) -> dict:
    return {
        "state": {rename(name): {k: resize(v) for k, v in moments.items()} for name, moments in state["state"].items()},
        "param_groups": [
            {**group, "params": [rename(name) for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def portable(state: dict, wrapper_prefix: str, padded_rows: int, true_rows: int) -> dict:
    """Names as the transformers model has them and vocabulary rows cut to the tokenizer's size.

    The loss wrapper (speed.ChunkedLossModel, "model.") and vocabulary padding exist only on some
    devices, so a checkpoint without them resumes whichever fast paths the next run uses. The padded
    rows' moments are zero (those rows never get a gradient), so cutting and re-padding loses nothing.
    """

    def resize(t):
        return t[:true_rows] if getattr(t, "ndim", 0) >= 1 and t.shape[0] == padded_rows != true_rows else t

    return _map(state, lambda name: name.removeprefix(wrapper_prefix), resize)


def localized(state: dict, wrapper_prefix: str, padded_rows: int, true_rows: int) -> dict:
    """The inverse of portable() for this run's wrapper and padding."""
    import torch

    def resize(t):
        if getattr(t, "ndim", 0) >= 1 and t.shape[0] == true_rows != padded_rows:
            return torch.cat([t, t.new_zeros((padded_rows - true_rows, *t.shape[1:]))])
        return t

    return _map(state, lambda name: wrapper_prefix + name, resize)


def restore_from_file(model, optimizer, path, distributed: bool, is_main: bool, to_local=lambda state: state) -> None:
    """Read the gathered state on rank 0 only (one host copy, not one per rank) and restore it.

    A corrupt file must stop every rank, not only rank 0 (the others would wait in the broadcast
    forever), so rank 0 shares the outcome of reading it first.
    """
    from .checkpoint import load_torch_file
    from .errors import FinetuneError

    state, problem = None, None
    if is_main or not distributed:
        try:
            state = load_torch_file(path)
        except FinetuneError as exc:
            problem = str(exc)
    if distributed:
        import torch.distributed as dist

        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise FinetuneError(problem)
    restore(model, optimizer, to_local(state) if state is not None else None, distributed, is_main)
