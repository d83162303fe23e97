"""The demo models' names, importable without torch (the CLI checks arguments against them before loading anything)."""

MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet", "mlp")
