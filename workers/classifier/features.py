"""Per-event detector features from what an inference server publishes (never the input pixels).

Every function here works on whole micro-batches (numpy arrays, no per-event Python).

- :func:`output_stats` — from the output vector, read as log-probabilities (the logits
  up to a constant): top-1 − top-2 margin of the log-probabilities, entropy, and the
  *energy* ``-logsumexp(z)`` of the centred logits ``z = log p - mean(log p)`` (the
  energy score of Liu et al. 2020 needs the logits' offset, which softmax discards;
  centring fixes the offset, so the energy reduces to ``mean(log p)``).
- :class:`ClassGaussian` — Lee et al. 2018's Mahalanobis detector on one layer:
  class-conditional Gaussians with one shared (pooled within-class) covariance,
  fitted on a model's *clean* reference. Classes are the model's own top-1 labels
  (a reference has no ground truth). Per event: the distance to the predicted
  class, the minimum over classes, their gap, whether the nearest class disagrees
  with the top-1 output, the distance to the k nearest clean embeddings (in the
  whitened space) and the embedding norm.
  ``pytorch_ood.detector.Mahalanobis`` fits from a torch model and a data loader and
  returns only the minimum distance; layerwatch has arrays and needs every class's
  distance, so the computation is done here, vectorised: whitening once by the
  Cholesky factor of the shared precision turns every squared distance into
  ``|zW|² − 2 zW·μW + |μW|²``, one matrix product for all classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-30
FEATURES_VERSION = "det-features/1"
OUTPUT_STATS = ("margin", "entropy", "energy", "max_logp")
LAYER_STATS = ("d_pred", "d_min", "d_gap", "disagree", "knn", "norm")


def log_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(n, C) float32 log-probabilities of softmax outputs (floored at 1e-30 before the log)."""
    p = np.asarray(outputs, dtype=np.float32)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"outputs must be (n, classes >= 2), got shape {p.shape}")
    return np.log(np.maximum(p, EPS))


def output_stats(outputs: np.ndarray) -> np.ndarray:
    """(n, 4) float32: margin, entropy, energy (of centred logits) and max log-probability."""
    logp = log_probabilities(outputs)
    top2 = -np.partition(-logp, 1, axis=1)[:, :2]
    p = np.exp(logp)
    out = np.empty((len(logp), len(OUTPUT_STATS)), dtype=np.float32)
    out[:, 0] = top2[:, 0] - top2[:, 1]
    out[:, 1] = -(p * logp).sum(axis=1)
    out[:, 2] = logp.mean(axis=1)  # -logsumexp(logp - mean(logp)), as logsumexp(logp) = 0
    out[:, 3] = top2[:, 0]
    return out


@dataclass
class ClassGaussian:
    """Class-conditional Gaussians with a shared covariance on one layer, plus a k-NN reference.

    Fit with :meth:`fit`; :meth:`features` gives the (n, 6) columns named by
    :data:`LAYER_STATS` (distances are square roots of squared Mahalanobis distances).
    """

    means_w: np.ndarray  # (C, d) class means in the whitened space
    means_sq: np.ndarray  # (C,) squared norms of means_w
    whiten: np.ndarray  # (d, d) W with precision = W Wᵀ
    centre: np.ndarray  # (d,) the reference mean (subtracted before whitening: better float32 conditioning)
    bank_w: np.ndarray  # (m, d) whitened clean reference rows for k-NN
    bank_sq: np.ndarray  # (m,)
    k: int

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, n_classes: int, *, k: int = 5,
            bank_size: int = 512, shrinkage: float = 0.05, seed: int = 0) -> ClassGaussian:
        """Fit on clean rows (n, d) with their class labels (n,) in [0, n_classes).

        ``shrinkage`` blends the pooled covariance with its mean-variance identity
        (a few hundred reference rows do not pin down a 64-d or 128-d covariance);
        the k-NN bank is a seeded sample of at most ``bank_size`` reference rows.
        Classes without reference rows get the overall mean.
        """
        x = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
            raise ValueError(f"embeddings must be (n >= 2, d) with n labels, got {x.shape} and {labels.shape}")
        centre = x.mean(axis=0)
        xc = x - centre
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        sums = np.zeros((n_classes, x.shape[1]))
        np.add.at(sums, labels, xc)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0)
        resid = xc - means[labels]
        cov = resid.T @ resid / max(len(x) - 1, 1)
        scale = np.trace(cov) / cov.shape[0] or 1.0
        cov = (1 - shrinkage) * cov + shrinkage * scale * np.eye(cov.shape[0])
        whiten = np.linalg.cholesky(np.linalg.inv(cov))  # precision = W Wᵀ, so |(x-μ) W|² = Mahalanobis²
        means_w = means @ whiten
        rng = np.random.default_rng(seed)
        bank = xc[rng.permutation(len(xc))[:bank_size]] @ whiten
        f32 = np.float32
        return cls(means_w.astype(f32), (means_w ** 2).sum(1).astype(f32), whiten.astype(f32), centre.astype(f32),
                   bank.astype(f32), (bank ** 2).sum(1).astype(f32), int(min(k, len(bank))))

    @property
    def dim(self) -> int:
        return int(self.whiten.shape[0])

    def distances(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whitened rows (n, d), squared Mahalanobis distances to every class (n, C)), float32."""
        z = (np.asarray(embeddings, dtype=np.float32) - self.centre) @ self.whiten
        zsq = (z * z).sum(axis=1, keepdims=True)
        d2 = zsq - 2.0 * (z @ self.means_w.T) + self.means_sq
        return z, np.maximum(d2, 0.0)

    def features(self, embeddings: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """(n, 6) float32 columns :data:`LAYER_STATS` for rows (n, d) and the model's top-1 labels (n,)."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.whiten.shape[0]:
            raise ValueError(f"embeddings must be (n, {self.whiten.shape[0]}), got shape {emb.shape}")
        z, d2 = self.distances(emb)
        rows = np.arange(len(z))
        nearest = d2.argmin(axis=1)
        d_pred = np.sqrt(d2[rows, predicted])
        d_min = np.sqrt(d2[rows, nearest])
        zsq = (z * z).sum(axis=1, keepdims=True)
        bank_d2 = np.maximum(zsq - 2.0 * (z @ self.bank_w.T) + self.bank_sq, 0.0)
        knn = np.sqrt(np.partition(bank_d2, self.k - 1, axis=1)[:, : self.k].mean(axis=1))
        out = np.empty((len(z), len(LAYER_STATS)), dtype=np.float32)
        out[:, 0] = d_pred
        out[:, 1] = d_min
        out[:, 2] = d_pred - d_min
        out[:, 3] = nearest != predicted
        out[:, 4] = knn
        out[:, 5] = np.linalg.norm(emb, axis=1)
        return out

    def state(self) -> dict[str, Any]:
        """Plain arrays and ints (what skops stores)."""
        return {"means_w": self.means_w, "means_sq": self.means_sq, "whiten": self.whiten, "centre": self.centre,
                "bank_w": self.bank_w, "bank_sq": self.bank_sq, "k": self.k}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClassGaussian:
        return cls(**{k: (int(v) if k == "k" else np.asarray(v, dtype=np.float32)) for k, v in state.items()})
