"""The P x K sampler: P identities with K images each in every batch, deterministic for a seed."""

import numpy as np
import pytest

from hybrid_jax.reid.sampler import PKSampler

# Identity of each example: person 0 has 5 images, 1 has 2 (fewer than K), 2..6 have 3 or 4; -1 is junk.
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, -1, 2, 2, 2, 3, 3, 3, 3, -1, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6])
P, K = 3, 3


def _batches(sampler: PKSampler, count: int) -> np.ndarray:
    return np.array([sampler[i] for i in range(count * P * K)]).reshape(count, P * K)


def test_every_batch_holds_k_images_of_p_identities():
    sampler = PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=0)
    for batch in _batches(sampler, 40):
        labels = LABELS[batch]
        assert (labels >= 0).all()  # junk is never drawn
        identities, counts = np.unique(labels, return_counts=True)
        assert len(identities) == P and (counts == K).all()
        for identity in identities:
            drawn = batch[labels == identity]
            if (identity == LABELS).sum() >= K:  # enough images: no repeats
                assert len(set(drawn)) == K


def test_a_round_shows_each_identity_once():
    """7 identities make rounds of 2 batches (the 7th sits out); over rounds everyone is seen."""
    sampler = PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=3)
    rounds = _batches(sampler, 20).reshape(10, 2 * P * K)
    for indices in rounds:
        identities, counts = np.unique(LABELS[indices], return_counts=True)
        assert len(identities) == 2 * P and (counts == K).all()
    assert set(LABELS[rounds.ravel()]) == set(range(7))


def test_same_seed_same_stream_other_seed_other_stream():
    first = _batches(PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=7), 10)
    again = _batches(PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=7), 10)
    other = _batches(PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=8), 10)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_access_equals_iteration():
    """A resumed iterator jumps to its position; index i must not depend on what was read before."""
    sampler = PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=1)
    forwards = [sampler[i] for i in range(60)]
    fresh = PKSampler(LABELS, identities_per_batch=P, images_per_identity=K, seed=1)
    assert [fresh[i] for i in reversed(range(60))] == forwards[::-1]


def test_too_few_identities_is_an_error():
    with pytest.raises(ValueError, match="7 identities, fewer than the 8"):
        PKSampler(LABELS, identities_per_batch=8, images_per_identity=2, seed=0)
