"""The attack classifier (seed 001): a tree ensemble on a model's output vector.

- :mod:`workers.classifier.dataset` — output vectors of every demo model on clean and
  attacked validation/test inputs, with labels; the leakage-free train/test split;
- :mod:`workers.classifier.model`   — features, :class:`AttackClassifier` (three heads:
  adversarial, attack type, target model), skops persistence with an allow-list;
- :mod:`workers.classifier.training`     — ``train`` / ``evaluate`` for ``layerwatch classifier``.
"""
