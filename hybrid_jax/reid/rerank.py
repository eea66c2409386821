"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017, arXiv 1701.08398).

Two images that are each among the other's k nearest neighbours are likely the same
person; a nearest neighbour that does not return the favour is often a look-alike. The
method encodes each image by its (expanded) k-reciprocal neighbours, weighted by
closeness, compares those encodings with a Jaccard distance, and blends it with the
original distance. It runs on the host over all query and gallery images together, with
sparse encodings, so its memory is the (Q + G)^2 input distances plus O((Q + G) k).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """The paper's settings for Market-1501 are the defaults."""

    k1: int = 20  # neighbourhood of the k-reciprocal sets
    k2: int = 6  # neighbours averaged in the local query expansion; 1 turns it off
    lambda_value: float = 0.3  # weight of the original distance in the final one


def nearest_neighbours(distances: np.ndarray, k: int) -> np.ndarray:
    """[N, k] indices of each row's k smallest distances, nearest first (a row's own index comes first)."""
    k = min(k, distances.shape[1])
    nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(distances, nearest, axis=1), axis=1, kind="stable")
    return np.take_along_axis(nearest, order, axis=1)


def reciprocal_sets(neighbours: np.ndarray) -> list[np.ndarray]:
    """For each p, the g in its neighbour list whose own list contains p."""
    own = np.arange(len(neighbours))[:, None, None]
    mutual = (neighbours[neighbours] == own).any(axis=-1)  # [N, k]: does neighbour j of p list p?
    return [row[keep] for row, keep in zip(neighbours, mutual)]


def expanded_sets(neighbours: np.ndarray, k1: int) -> list[np.ndarray]:
    """R*(p, k1): p's k1-reciprocal set, grown by the k1/2-reciprocal set of each member that mostly lies in it."""
    full = reciprocal_sets(neighbours[:, : k1 + 1])
    half = reciprocal_sets(neighbours[:, : int(np.around(k1 / 2)) + 1])
    expanded = []
    for members in full:
        grown = [members]
        for candidate in members:
            extra = half[candidate]
            if len(np.intersect1d(extra, members)) > 2 / 3 * len(extra):
                grown.append(extra)
        expanded.append(np.unique(np.concatenate(grown)))
    return expanded


def k_reciprocal_distance(distances: np.ndarray, num_queries: int, config: RerankConfig = RerankConfig()
                          ) -> np.ndarray:
    """Re-ranked [Q, G] distances from all [Q+G, Q+G] distances (queries first).

    Args:
      distances: non-negative distances among the queries and the gallery together.
      num_queries: Q; rows and columns [0, Q) are the queries.
    """
    count = len(distances)
    distances = distances / np.maximum(distances.max(axis=1, keepdims=True), 1e-12)
    neighbours = nearest_neighbours(distances, max(config.k1 + 1, config.k2))
    rows, cols, weights = [], [], []
    for p, members in enumerate(expanded_sets(neighbours, config.k1)):
        weight = np.exp(-distances[p, members])
        rows.append(np.full(len(members), p))
        cols.append(members)
        weights.append(weight / weight.sum())
    encoding = scipy.sparse.csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                                       shape=(count, count))
    if config.k2 > 1:  # local query expansion: average each encoding with its k2 nearest neighbours'
        near = neighbours[:, : config.k2]
        averaging = scipy.sparse.csr_matrix((np.full(near.size, 1.0 / near.shape[1]),
                                             (np.repeat(np.arange(count), near.shape[1]), near.ravel())),
                                            shape=(count, count))
        encoding = (averaging @ encoding).tocsr()
    by_column = encoding.tocsc()
    overlap = np.zeros((num_queries, count - num_queries))
    for q in range(num_queries):
        row = encoding.getrow(q)
        # sum_j min(V_qj, V_gj) over the j where the query's encoding is non-zero.
        shared = by_column[:, row.indices]
        shared.data = np.minimum(shared.data, np.repeat(row.data, np.diff(shared.indptr)))
        overlap[q] = np.asarray(shared.sum(axis=1)).ravel()[num_queries:]
    # Encodings sum to one, so sum_j max(V_qj, V_gj) = 2 - sum_j min(V_qj, V_gj).
    jaccard = 1.0 - overlap / (2.0 - overlap)
    return (1 - config.lambda_value) * jaccard + config.lambda_value * distances[:num_queries, num_queries:]
