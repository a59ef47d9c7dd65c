"""Run by test_distributed.py under torchrun with 2 gloo processes: FSDP2 (fully_shard) optimizer state
through finetune.optimizer_state, compared with an unsharded single-process reference.

accelerate only enables FSDP on GPUs, so this drives torch's FSDP2 directly (it runs on CPU with
gloo); the training loop calls the same two functions under accelerate's FSDP.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from finetune import checkpoint, optimizer_state


def build():
    torch.manual_seed(0)
    # Llama, not GPT-2: GPT-2's key biases get a zero gradient, and Adam turns their float noise
    # into full-size updates that differ between any two runs.
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def train_step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1)
    batches = [torch.randint(0, 96, (4, 16)) for _ in range(3)]  # global batches; each rank takes its half

    sharded = build()
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    optimizer = adamw(sharded)
    for ids in batches[:2]:
        train_step(sharded, optimizer, ids.chunk(world)[rank])

    full = optimizer_state.gather(sharded, optimizer, distributed=True)
    path = out / "optimizer.pt"
    if rank == 0:
        checkpoint.save_torch_file(full, path)
    dist.barrier()

    # A fresh optimizer restored from the file holds exactly this rank's shards.
    restored = adamw(sharded)
    optimizer_state.restore_from_file(sharded, restored, path, distributed=True, is_main=rank == 0)
    for param in sharded.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = optimizer.state[param][key], restored.state[param][key]
            a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
            assert torch.equal(a, b), (key, rank)

    if rank == 0:
        # The file holds whole tensors keyed by name, equal to an unsharded run on the global batches,
        # and resumes a single-process run: the next step gives the same weights as the sharded run's.
        reference = build()
        ref_optimizer = adamw(reference)
        for ids in batches[:2]:
            train_step(reference, ref_optimizer, ids)
        by_name = dict(reference.named_parameters())
        assert set(full["state"]) == set(name for name, p in by_name.items() if p.requires_grad), sorted(full["state"])
        for name, state in full["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], ref_optimizer.state[by_name[name]][key], rtol=1e-4, atol=1e-7)
        single = build()
        single.load_state_dict(reference.state_dict())
        single_optimizer = adamw(single)
        optimizer_state.restore_from_file(single, single_optimizer, path, distributed=False, is_main=True)
        train_step(single, single_optimizer, batches[2])
        # The same step from fresh moments lands far away: the tolerance below can tell them apart.
        fresh = build()
        fresh.load_state_dict(reference.state_dict())
        train_step(fresh, adamw(fresh), batches[2])
        moved = max((a - b).abs().max().item() for a, b in zip(fresh.parameters(), single.parameters()))
        assert moved > 1e-3, moved
    train_step(sharded, restored, batches[2].chunk(world)[rank])
    gathered = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    if rank == 0:
        for name, param in single.named_parameters():
            # atol: a weight whose gradient is float noise gets a noise-sized Adam update.
            torch.testing.assert_close(param, gathered[name], rtol=1e-4, atol=1e-4)
        (out / "ok").write_text("ok")
    dist.barrier()  # no rank tears down its gloo connections while the other still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
