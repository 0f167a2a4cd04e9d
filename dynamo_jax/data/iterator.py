"""A deterministic, checkpointable prompt-batch iterator.  [host]

Epoch e visits the records in the order ``permutation(seed, e)`` (a fresh numpy Generator seeded
with ``(seed, e)``, so any epoch's order is recomputed without replaying earlier ones). The state is
two integers, the epoch and the position of the next unseen record in that epoch's order, which is
all a checkpoint needs to resume with exactly the next prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def records_digest(records: Sequence[Any]) -> str:
    """A short hash of records' contents (JSON, keys sorted): equal data gives equal digests."""
    text = json.dumps(list(records), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PromptIterator:
    """Endless batches of records, reshuffled every epoch.

    drop_remainder=True: every batch has exactly `batch_size` records and the last
    ``len(records) % batch_size`` of each epoch's order are skipped (static shapes). False: the
    last batch of an epoch is shorter. A batch never mixes two epochs.

    `epoch` is the epoch of the batch most recently returned (0 before the first), so a trainer
    can refresh per-epoch state when it changes.
    """

    def __init__(
        self,
        records: Sequence[Any],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(records) == 0:
            raise ValueError("no records to iterate over")
        if int(seed) < 0:  # numpy's SeedSequence would only reject it at the first batch
            raise ValueError(f"seed must be >= 0, got {seed}")
        if drop_remainder and batch_size > len(records):
            raise ValueError(
                f"batch_size {batch_size} > {len(records)} records with drop_remainder=True "
                "would never yield a batch"
            )
        self.records = records
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = np.arange(0)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """A hash of the records' contents (computed once): a resumed run must iterate over the
        same records, not only as many."""
        if self._digest is None:
            self._digest = records_digest(self.records)
        return self._digest

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.records), self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def _epoch_end(self) -> int:
        n = len(self.records)
        return n - n % self.batch_size if self.drop_remainder else n

    def order(self, epoch: int) -> np.ndarray:
        """Record indices in the visiting order of `epoch`."""
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_indices(self) -> np.ndarray:
        """Indices (into `records`) of the next batch; advances the iterator."""
        if self._position >= self._epoch_end():
            self._epoch += 1
            self._position = 0
        if self._order_epoch != self._epoch:
            self._order = self.order(self._epoch)
            self._order_epoch = self._epoch
        start = self._position
        stop = min(start + self.batch_size, self._epoch_end())
        self._position = stop
        return self._order[start:stop]

    def __next__(self) -> list[Any]:
        return [self.records[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def state(self) -> dict[str, Any]:
        """Small, JSON-able: resume with `restore` to continue with the next unseen prompt."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_records": len(self.records),
            "digest": self.digest,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`. The seed, the record count and (in states that record it)
        the records' digest must match: the same data."""
        for key, mine in (("seed", self.seed), ("num_records", len(self.records))):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"iterator state has {key}={int(state[key])}, this one {mine}")
        if "digest" in state and state["digest"] != self.digest:
            raise ValueError(
                f"iterator state is over other records (digest {state['digest']}, these "
                f"{self.digest}): the same number of records, different contents"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.records):
            raise ValueError(f"bad iterator state {state}")
        self._epoch, self._position = epoch, position
