"""A run's rows -> their image embeddings, read one mini-batch of row positions at a time.

A feature store is memory-mapped, so its vectors are never copied whole; an in-memory array
(scoring) is read the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fuse.errors import RunError

__all__ = ["Embeddings"]

_RowReader = Callable[[np.ndarray], np.ndarray]


class Embeddings:
    """A run's rows -> embeddings, read in mini-batches.

    `rows(index)` returns shape (len(index), views, dim) for run-row positions `index` (float16
    from a store; an array's own dtype).
    Built from a memory-mapped feature store (`from_store`) or an in-memory array (`from_array`).
    """

    def __init__(self, read: _RowReader, n: int, views: int, dim: int):
        self._read = read
        self.n, self.views, self.dim = n, views, dim

    @classmethod
    def from_array(cls, array: np.ndarray) -> Embeddings:
        array = np.asarray(array)
        if array.ndim != 3:
            raise RunError(f"embeddings: expected shape (rows, views, dim), got {array.shape}")
        return cls(lambda index: array[index], array.shape[0], array.shape[1], array.shape[2])

    @classmethod
    def from_store(cls, store, ids: Sequence[str]) -> Embeddings:
        id_array = np.asarray(list(ids), dtype=object)
        return cls(
            lambda index: store.read(id_array[index].tolist()),
            len(id_array),
            int(store.views),
            int(store.dim),
        )

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Shape (len(index), views, dim), rows in the order asked."""
        return self._read(np.asarray(index))

    def pick(self, index: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Shape (len(index), dim): view `views[i]` of row `index[i]` (one view per image)."""
        block = self.rows(index)
        return block[np.arange(len(block)), np.asarray(views)]

    def mean_over_views(self, batch: int = 4096, dtype=np.float32) -> np.ndarray:
        """Shape (n, dim) of `dtype`: each row's embedding averaged over its views."""
        out = np.empty((self.n, self.dim), dtype=dtype)
        for start in range(0, self.n, batch):
            index = np.arange(start, min(start + batch, self.n))
            out[index] = self.rows(index).astype(np.float32).mean(axis=1)
        return out
