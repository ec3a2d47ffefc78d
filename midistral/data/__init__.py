"""Data: corpus preparation (prepare.py), the chorale default (chorales.py), batches (dataset.py), stats."""

from midistral.data.dataset import TokenChunks, epoch_order, load_splits
from midistral.data.prepare import made_with, prepare, prepared_dir

__all__ = ["prepare", "prepared_dir", "made_with", "TokenChunks", "epoch_order", "load_splits"]
