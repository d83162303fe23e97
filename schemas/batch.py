"""The in-memory form of a PredictionBatch: one model's micro-batch, column-wise numpy arrays.

Agents and the publisher work on this object; the codec turns it into Avro bytes and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ROLES = ("live", "reference")
PENULTIMATE = "penultimate"  # the layer every model publishes: the default for tests, probing and reports
COMBINED = "__combined__"  # DriftResult.layer of the test over all layers of a window together
COUNT = "__count__"  # DriftResult.layer of the count test of a window's flagged events (attacks hidden in traffic)
CLIENT_PREFIX = "__client__:"  # DriftResult.layer of one heavy client's own test: the prefix and the client id


def is_layer(name: str) -> bool:
    """True for a DriftResult row of a real layer, False for the combined, count and client rows."""
    return not name.startswith("__")


@dataclass
class PredictionBatch:
    """n predictions of one model: ids, timestamps, outputs (n x classes) and tapped layers (n x dim).

    Example:
        >>> import numpy as np
        >>> b = PredictionBatch.build("cnn", ["e1", "e2"], outputs=np.eye(2, dtype=np.float32),
        ...                           layers={"penultimate": np.ones((2, 4), np.float32)})
        >>> b.n, b.predicted.tolist(), b.client_ids
        (2, [0, 1], ['', ''])
    """

    model_id: str
    model_version: str
    role: str
    event_ids: list[str]
    client_ids: list[str]
    ts_ms: np.ndarray  # (n,) int64
    predicted: np.ndarray  # (n,) int32
    outputs: np.ndarray  # (n, classes) float32 probabilities
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, dim) f16|f32
    uncertainty: np.ndarray | None = None  # (n,) float32
    truth: np.ndarray | None = None  # (n,) int32
    attack: list[str] | None = None  # simulation ground truth ("" for clean)
    inputs: np.ndarray | None = None  # (n, k) float32, optional copy of the inputs (demo images)

    @property
    def n(self) -> int:
        return len(self.event_ids)

    @classmethod
    def build(
        cls,
        model_id: str,
        event_ids: list[str],
        outputs: np.ndarray,
        layers: dict[str, np.ndarray],
        *,
        model_version: str = "1",
        role: str = "live",
        client_ids: list[str] | None = None,
        ts_ms: np.ndarray | None = None,
        predicted: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
        truth: np.ndarray | None = None,
        attack: list[str] | None = None,
        inputs: np.ndarray | None = None,
    ) -> "PredictionBatch":
        """Fill the defaults a caller rarely cares about: now as timestamp, argmax as prediction, no client."""
        n = len(event_ids)
        outputs = np.ascontiguousarray(outputs, dtype=np.float32)
        if ts_ms is None:
            import time

            ts_ms = np.full(n, int(time.time() * 1000), dtype=np.int64)
        if predicted is None:
            predicted = outputs.argmax(axis=1) if outputs.ndim == 2 else np.zeros(n)
        return cls(
            model_id=model_id,
            model_version=model_version,
            role=role,
            event_ids=list(event_ids),
            client_ids=list(client_ids) if client_ids is not None else [""] * n,
            ts_ms=np.asarray(ts_ms, dtype=np.int64),
            predicted=np.asarray(predicted, dtype=np.int32),
            outputs=outputs,
            layers={k: np.ascontiguousarray(v) for k, v in layers.items()},
            uncertainty=None if uncertainty is None else np.asarray(uncertainty, dtype=np.float32),
            truth=None if truth is None else np.asarray(truth, dtype=np.int32),
            attack=None if attack is None else list(attack),
            inputs=None if inputs is None else np.ascontiguousarray(inputs, dtype=np.float32),
        )

    def slice(self, start: int, stop: int) -> "PredictionBatch":
        """Rows [start, stop) as a new batch (views, no copies of the matrices)."""
        pick = slice(start, stop)
        return PredictionBatch(
            model_id=self.model_id,
            model_version=self.model_version,
            role=self.role,
            event_ids=self.event_ids[pick],
            client_ids=self.client_ids[pick],
            ts_ms=self.ts_ms[pick],
            predicted=self.predicted[pick],
            outputs=self.outputs[pick],
            layers={k: v[pick] for k, v in self.layers.items()},
            uncertainty=None if self.uncertainty is None else self.uncertainty[pick],
            truth=None if self.truth is None else self.truth[pick],
            attack=None if self.attack is None else self.attack[pick],
            inputs=None if self.inputs is None else self.inputs[pick],
        )


@dataclass
class LabelBatch:
    """The attack classifier's verdicts on the n events of one live micro-batch, column-wise.

    Example:
        >>> import numpy as np
        >>> lb = LabelBatch("cnn", "1", "clf-1", ["e1", "e2"], np.array([5, 6]), np.array([0.9, 0.1], np.float32),
        ...                 np.array(["pgd", "clean"]), np.array([0.8, 0.9], np.float32),
        ...                 np.array(["cnn", "cnn"]), np.array([0.7, 0.6], np.float32))
        >>> lb.n, lb.attack_type.tolist()
        (2, ['pgd', 'clean'])
    """

    model_id: str
    model_version: str
    classifier_version: str
    event_ids: list[str]
    ts_ms: np.ndarray  # (n,) int64
    p_adversarial: np.ndarray  # (n,) float32, >= 0.5 means flagged
    attack_type: np.ndarray  # (n,) str: "clean" or an attack preset
    attack_prob: np.ndarray  # (n,) float32
    target_model: np.ndarray  # (n,) str: the model the attack was crafted on
    target_prob: np.ndarray  # (n,) float32
    family: np.ndarray | None = None  # (n,) str: "clean" or an attack family (per-event detector only)
    score_kind: str = "classifier"  # "supervised" | "unsupervised" (per-event detector) | "classifier"
    features_version: str = ""  # the detector's features version ("" for the output-only classifier)

    @property
    def n(self) -> int:
        return len(self.event_ids)
