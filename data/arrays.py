"""In-memory datasets: named tensors with a leading item axis, preprocessed once, indexed per item."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Item i = {name: tensor[i] for each array} plus its "item_id"; __getitem__ never touches a file."""

    def __init__(self, arrays: dict[str, torch.Tensor], item_ids: list[str]):
        self.arrays = arrays
        self.item_ids = list(item_ids)
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, index: int) -> dict:
        item = {name: tensor[index] for name, tensor in self.arrays.items()}
        item["item_id"] = self.item_ids[index]
        return item


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (ids and other lists stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
