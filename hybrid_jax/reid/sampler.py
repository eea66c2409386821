"""P x K identity-balanced sampling (Hermans et al., "In Defense of the Triplet Loss", arXiv 1703.07737).

A batch-hard triplet loss needs, for every image in a batch, other images of the same
person and images of other people: each batch holds K images of each of P identities.
`PKSampler` is a grain `MapDataset` of example indices, endless and random-access:
index i is a pure function of (seed, i), so every process derives the same stream,
the pipeline's per-process slicing keeps whole identities' blocks together in each
global batch, and a checkpointed iterator position resumes the same batches.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class PKSampler(grain.MapDataset):
    """Endless example indices; each run of P*K holds K examples of each of P distinct identities.

    The stream is cut into rounds. A round shuffles the identities, drops the
    remainder that would not fill P, and takes K examples of each: without replacement,
    or with it for an identity that has fewer than K. Every identity appears once per
    round, so rare and frequent people are seen equally often.
    """

    def __init__(self, labels: np.ndarray, *, identities_per_batch: int, images_per_identity: int, seed: int):
        """Args:
          labels: the identity of each example; negative values (junk, distractors) are never drawn.
          identities_per_batch: P.
          images_per_identity: K.
          seed: the stream is a pure function of the seed.
        """
        super().__init__()
        labels = np.asarray(labels)
        identities = np.unique(labels[labels >= 0])
        if identities_per_batch < 1 or images_per_identity < 1:
            raise ValueError(f"P={identities_per_batch} and K={images_per_identity} must both be at least 1.")
        if len(identities) < identities_per_batch:
            raise ValueError(f"the split has {len(identities)} identities, fewer than the {identities_per_batch} each "
                             f"batch needs (P = batch size / K); lower the batch size or raise K.")
        self._members = [np.flatnonzero(labels == identity) for identity in identities]
        self._p, self._k, self._seed = identities_per_batch, images_per_identity, seed
        self._round_length = len(identities) // identities_per_batch * identities_per_batch * images_per_identity
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        """P * K: a global batch cut from this stream at a multiple of it holds whole identities."""
        return self._p * self._k

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"PKSampler(P={self._p}, K={self._k}, identities={len(self._members)}, seed={self._seed})"

    def round(self, number: int) -> np.ndarray:
        """The example indices of round `number`: P*K-sized blocks of K examples of P identities."""
        cached = self._cached
        if cached is not None and cached[0] == number:
            return cached[1]
        rng = np.random.default_rng([self._seed, number])
        order = rng.permutation(len(self._members))[: self._round_length // self._k]
        picks = [rng.choice(self._members[i], self._k, replace=len(self._members[i]) < self._k) for i in order]
        indices = np.concatenate(picks)
        self._cached = (number, indices)  # one tuple assignment: safe under grain's reader threads
        return indices

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        number, offset = divmod(index, self._round_length)
        return int(self.round(number)[offset])
