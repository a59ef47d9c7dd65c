"""Token blocks and supervised examples -> batches: epoch sampler, collation, loaders, the endless epoch iterator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from finetune.supervised import Examples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import Tensor
    from torch.utils.data import DataLoader

    from finetune.cache_entry import TokenBlocks


class EpochShuffleSampler:
    """A permutation of the blocks per epoch, drawn from (seed, epoch) alone.

    Because the order is a pure function of seed and epoch, a resumed run can rebuild it and skip
    to its position without storing sampler state.
    """

    def __init__(
        self, num_items: int, seed: int, shuffle: bool = True, lengths: Optional[np.ndarray] = None, group_size: int = 0
    ):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        # Variable-length examples: within each group of `group_size` shuffled items, longest first,
        # so a batch holds similar lengths and little of it is padding (HF's group_by_length idea).
        self.lengths = lengths
        self.group_size = group_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_items))
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_items)
        if self.lengths is not None and self.group_size:
            groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        return iter(order.tolist())


def collate_blocks(blocks: list[np.ndarray]) -> Tensor:
    import torch

    return torch.from_numpy(np.stack(blocks))


def collate_examples(pad_id: int):
    """Pad a batch on the right to its longest example; padding and context tokens get label -100."""

    def collate(items):
        import torch

        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(items):
            n = len(ids)
            input_ids[row, :n] = torch.from_numpy(ids)
            labels[row, :n] = torch.from_numpy(np.where(mask == 1, ids, -100))
            attention[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    return collate


def make_dataloader(
    blocks: Union[TokenBlocks, Examples], batch_size: int, seed: int, shuffle: bool, pad_id: int = 0
) -> DataLoader:
    """Batches of fixed blocks (a tensor), or of padded examples (a dict with labels and attention mask)."""
    import torch
    from torch.utils.data import DataLoader

    if isinstance(blocks, Examples):
        sampler = EpochShuffleSampler(len(blocks), seed, shuffle, lengths=blocks.lengths(), group_size=batch_size * 50)
        collate = collate_examples(pad_id)
    else:
        sampler = EpochShuffleSampler(len(blocks), seed, shuffle)
        collate = collate_blocks
    return DataLoader(
        blocks,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG,
        # and a resumed run (which starts an iterator mid-epoch) would see different dropout.
        generator=torch.Generator().manual_seed(seed),
    )


def endless_batches(
    loader: DataLoader, sampler: EpochShuffleSampler, epoch: int, skip: int, accelerator: Accelerator
) -> Iterator[tuple[int, int, Any]]:
    """Endless (epoch, index-in-epoch, batch); each pass reshuffles via the sampler's epoch.

    `skip` batches of the first epoch are passed over without being loaded, so a resumed run
    continues with exactly the batch the interrupted run would have seen next.
    """
    while True:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        # The prepared loader (accelerate's DataLoaderShard) sets the sampler's epoch from its own
        # pass counter at the start of every pass, overriding sampler.set_epoch: a resumed run's
        # counter starts at 0, so its second pass would repeat the first one's order. Setting the
        # epoch on the loader itself sets both.
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(epoch)
        else:
            sampler.set_epoch(epoch)
        for index, batch in enumerate(epoch_loader, start=skip):
            yield epoch, index + 1, batch
        epoch, skip = epoch + 1, 0
