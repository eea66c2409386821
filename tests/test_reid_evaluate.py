"""The re-ID protocol against values worked out by hand, and k-reciprocal re-ranking against the paper's definitions."""

import itertools

import numpy as np
import pytest

from hybrid_jax.reid.distance import pairwise_distance
from hybrid_jax.reid.evaluate import EmbeddedSet, distance_matrix, evaluate_retrieval
from hybrid_jax.reid.rerank import RerankConfig, k_reciprocal_distance

# Everyone stands on a line: embedding [x, 0], so Euclidean distances are |x_q - x_g|.
GALLERY = [  # (person, camera, x)
    (1, 1, 1.0),  # same person and camera as query 0: excluded for it
    (2, 2, 2.0),  # same person and camera as query 1: excluded for it
    (1, 2, 3.0),
    (-1, 2, 0.5),  # junk: nearest to query 0, but neither hit nor miss
    (0, 3, 1.5),  # distractor: a miss for everyone
    (1, 3, 5.0),
    (2, 1, 6.0),
]
QUERIES = [
    (1, 1, 0.0),  # kept: g4 miss, g1 miss, g2 HIT, g5 HIT, g6 miss -> first hit at rank 3, AP (1/3 + 2/4) / 2
    (2, 2, 2.1),  # kept: g4 miss, g2 miss, g0 miss, g5 miss, g6 HIT -> first hit at rank 5, AP 1/5
    (3, 1, 0.0),  # nobody else is person 3: not scored
    (2, 3, 6.2),  # kept: g6 HIT, g5 miss, g2 miss, g1 HIT, g4 miss, g0 miss -> rank 1, AP (1/1 + 2/4) / 2
]
AP = [(1 / 3 + 2 / 4) / 2, 1 / 5, (1 + 2 / 4) / 2]


def _embedded(rows) -> EmbeddedSet:
    people, cameras, x = (np.array(column) for column in zip(*rows))
    return EmbeddedSet(np.stack([x, np.zeros_like(x)], 1).astype(np.float32), people.astype(np.int32),
                       cameras.astype(np.int32))


@pytest.mark.parametrize("block_size", [256, 3])  # one block, and blocks with a padded last one
def test_cmc_and_map_match_the_hand_worked_example(block_size):
    metrics = evaluate_retrieval(_embedded(QUERIES), _embedded(GALLERY), metric="euclidean", block_size=block_size,
                                 ranks=(1, 3, 5))
    assert metrics["scored_queries"] == 3
    assert metrics["rank1"] == pytest.approx(100 / 3)  # only query 3 finds its person first
    assert metrics["rank3"] == pytest.approx(200 / 3)  # query 0 at rank 3; query 1 not until rank 5
    assert metrics["rank5"] == pytest.approx(100.0)
    assert metrics["mAP"] == pytest.approx(100 * np.mean(AP))


def test_moving_a_match_to_another_camera_makes_it_count():
    """g0 in another camera than query 0 becomes its first hit, ranked first although junk (g3) is nearer."""
    gallery = _embedded(GALLERY)
    relabelled = EmbeddedSet(gallery.embeddings, gallery.person_ids, np.where(gallery.person_ids == 1, 9, 2))
    metrics = evaluate_retrieval(_embedded(QUERIES[:1]), relabelled, metric="euclidean", ranks=(1, 2))
    # Now g0 is in another camera: ranking g3 (junk, dropped), g0 HIT -> rank 1; hits g0, g2, g5 at 1, 4, 5.
    assert metrics["rank1"] == 100.0
    assert metrics["mAP"] == pytest.approx(100 * (1 + 2 / 4 + 3 / 5) / 3)


def test_no_scorable_query_is_an_error():
    with pytest.raises(ValueError, match="no query has a correct gallery match"):
        evaluate_retrieval(_embedded(QUERIES[2:3]), _embedded(GALLERY), metric="euclidean")


def test_blocked_distances_equal_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
    euclidean = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    cosine = 1 - (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
    np.testing.assert_allclose(distance_matrix(a, b, "euclidean", block_size=4), euclidean, atol=1e-5)
    np.testing.assert_allclose(distance_matrix(a, b, "cosine", block_size=4), cosine, atol=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        pairwise_distance(a, b, "manhattan")


# --------------------------------------------------------------------------- #
# k-reciprocal re-ranking
# --------------------------------------------------------------------------- #


def _rerank_by_the_definitions(distances: np.ndarray, num_queries: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al. 2017, eqs. 1-12, with dense loops and Python sets."""
    n = len(distances)
    d = distances / distances.max(axis=1, keepdims=True)
    ranking = [list(np.argsort(row, kind="stable")) for row in d]

    def reciprocal(p: int, k: int) -> set[int]:
        return {g for g in ranking[p][: k + 1] if p in ranking[g][: k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        expanded = set(r)
        for q in r:
            half = reciprocal(q, int(np.around(k1 / 2)))
            if len(half & r) > 2 / 3 * len(half):
                expanded |= half
        members = sorted(expanded)
        v[p, members] = np.exp(-d[p, members]) / np.exp(-d[p, members]).sum()
    if k2 > 1:
        v = np.stack([v[ranking[p][:k2]].mean(axis=0) for p in range(n)])
    out = np.zeros((num_queries, n - num_queries))
    for q, g in itertools.product(range(num_queries), range(num_queries, n)):
        jaccard = 1 - np.minimum(v[q], v[g]).sum() / np.maximum(v[q], v[g]).sum()
        out[q, g - num_queries] = (1 - lam) * jaccard + lam * d[q, g]
    return out


@pytest.mark.parametrize("k1, k2", [(5, 3), (4, 1)])
def test_rerank_equals_the_papers_definitions(k1, k2):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 4))
    points = centres[rng.integers(0, 6, 40)] + 0.4 * rng.normal(size=(40, 4))
    distances = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    got = k_reciprocal_distance(distances, 12, RerankConfig(k1=k1, k2=k2, lambda_value=0.3))
    np.testing.assert_allclose(got, _rerank_by_the_definitions(distances, 12, k1, k2, 0.3), atol=1e-9)


def test_rerank_lifts_a_hard_example():
    """A look-alike that is near the query but not mutually near loses to a true match after re-ranking."""
    rng = np.random.default_rng(2)
    people = np.repeat(np.arange(1, 41), 6)
    cameras = np.tile(np.arange(1, 7), 40)
    centres = rng.normal(size=(41, 16))
    embeddings = (centres[people] + 0.9 * rng.normal(size=(len(people), 16))).astype(np.float32)
    query_rows = cameras == 1
    query = EmbeddedSet(embeddings[query_rows], people[query_rows], cameras[query_rows])
    gallery = EmbeddedSet(embeddings[~query_rows], people[~query_rows], cameras[~query_rows])
    plain = evaluate_retrieval(query, gallery, metric="euclidean")
    reranked = evaluate_retrieval(query, gallery, metric="euclidean", rerank=RerankConfig(k1=6, k2=3))
    assert reranked["mAP"] > plain["mAP"] + 2
