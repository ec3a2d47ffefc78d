"""Data: corpus preparation (prepare.py), the chorale default (chorales.py), batches (dataset.py), stats."""

from midistral.data.dataset import TokenChunks, epoch_order, load_splits
from midistral.data.prepare import prepare, prepared_dir

__all__ = ["prepare", "prepared_dir", "TokenChunks", "epoch_order", "load_splits"]
