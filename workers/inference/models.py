"""Demo models: three small digit classifiers trained in seconds, cached as state dicts.

Three architectures give the attack classifier a "which model was attacked" signal
(seed 001) and the layer study several depths to compare (seed 000):

- ``cnn``    three conv blocks (8x8 -> 4x4 -> 2x2), a 64-unit dense layer, dropout, head;
- ``resnet`` a ResNet-style net: stem, three residual basic blocks (BatchNorm, identity or
  1x1 projection shortcut), global average pooling = the 64-d penultimate layer, dropout, head;
- ``mlp``    three dense layers (128, 128, 64) with dropout, head.

Each ends with an ``nn.Linear`` (so :class:`LayerTap` finds the penultimate layer, the
head's input) and has dropout (MC-dropout uncertainty at serving time). Modules avoid
in-place operations, so tapped activations are never overwritten.

Trained weights live in ``<state_dir>/models/<name>.pt`` (a state dict, loaded with
``torch.load(..., weights_only=True)``) with ``<name>.json`` beside it (validation and
test accuracy, seed, version, training time, sha256 of the .pt). A model whose JSON is
missing or stale (other seed or architecture version, or a hash mismatch) is retrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from workers.inference import names

from workers.inference.data import IMAGE_SHAPE, N_CLASSES, demo_split
from workers.inference.tap import PENULTIMATE, LayerTap
from workers.progress import progress_bar

DEFAULT_STATE_DIR = "./.layerwatch"


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (None: leave as is), then restore.

    The demo models are tiny: one thread trains them as fast as two on an idle machine
    and several times faster on a busy one (no oversubscription of shared cores).
    """
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- architectures ----------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv(16) -> conv(32) + pool -> conv(64) + pool -> dense(64) -> dropout -> head(10)."""

    STUDY_LAYERS = ("block1", "block2", "block3", PENULTIMATE)

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(64, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.fc1(self.block3(self.block2(self.block1(x))))))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with a shortcut (identity, or 1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem(16) -> block(16) -> block(32, /2) -> block(64, /2) -> global average pool -> dropout -> head."""

    STUDY_LAYERS = ("stem", "layer1", "layer2", "layer3.conv1", PENULTIMATE)

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(64, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.dropout(self.pool(x)))


class SmallMLP(nn.Module):
    """flatten -> dense(128) -> dropout -> dense(128) -> dropout -> dense(64) -> dropout -> head."""

    STUDY_LAYERS = ("fc1", "fc2", PENULTIMATE)

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU())
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.drop3 = nn.Dropout(dropout)
        self.head = nn.Linear(64, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.fc1(x))
        x = self.drop2(self.fc2(x))
        return self.head(self.drop3(self.fc3(x)))


@dataclass(frozen=True)
class Architecture:
    """How to build and train one demo model; bump ``version`` when the recipe changes."""

    build: Callable[[], nn.Module]
    version: str = "1"
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4


ARCHITECTURES: dict[str, Architecture] = {
    "cnn": Architecture(SmallCNN, epochs=25),
    "resnet": Architecture(SmallResNet, epochs=20),
    "mlp": Architecture(SmallMLP, epochs=60),
}
MODEL_NAMES = tuple(ARCHITECTURES)
assert MODEL_NAMES == names.MODEL_NAMES, "workers/inference/names.py lists the demo models"

#: Layers a demo model publishes besides the penultimate one: a shallow and a middle one.
#: The per-event detector (workers.classifier.detector) reads them: on these small nets strong
#: L∞ attacks reach typical-looking penultimate embeddings while early layers still see the noise.
DETECTOR_LAYERS: dict[str, tuple[str, ...]] = {"cnn": ("block1", "block2"), "resnet": ("stem", "layer2"),
                                               "mlp": ("fc1", "fc2")}


def build_model(name: str) -> nn.Module:
    """A fresh (untrained) module of the named demo architecture."""
    return ARCHITECTURES[_check_name(name)].build()


def layer_names(model_name: str) -> list[str]:
    """Tappable layer names of a demo model, shallow -> deep, ending with ``"penultimate"``.

    The names are module names (``LayerTap(module, layers=...)``) except the last, the
    auto-found penultimate layer; conv maps are reduced by global average pooling.
    """
    return list(type(build_model(model_name)).STUDY_LAYERS)


def _check_name(name: str) -> str:
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown demo model {name!r}: known models are {', '.join(ARCHITECTURES)}")
    return name


# --- training ---------------------------------------------------------------------------------


def accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``module`` (eval mode) on (x, y)."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.tensor(x[start : start + batch_size], device=device)
            correct += int((module(xb).argmax(1).cpu().numpy() == y[start : start + batch_size]).sum())
    module.train(was_training)
    return correct / max(len(x), 1)


def train_model(
    name: str,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    threads: int | None = 1,
) -> tuple[nn.Module, dict]:
    """Train one demo model on the fixed split; returns (module in eval mode, metadata dict).

    Seeded (weights, shuffling, dropout) without touching the global torch RNG state;
    ``threads`` CPU threads (see :func:`torch_threads`).
    """
    arch = ARCHITECTURES[_check_name(name)]
    device = torch.device(device) if device is not None else default_device()
    split = demo_split(seed)
    started = time.perf_counter()
    with torch_threads(threads if device.type == "cpu" else None), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = arch.build().to(device)
        gen = torch.Generator().manual_seed(seed)
        x = torch.tensor(split.x_train, device=device)
        y = torch.tensor(split.y_train, device=device)
        opt = torch.optim.Adam(module.parameters(), lr=arch.lr, weight_decay=arch.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=arch.epochs)
        loss_fn = nn.CrossEntropyLoss()
        module.train()
        for epoch in range(arch.epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            for start in range(0, len(x), arch.batch_size):
                pick = order[start : start + arch.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(module(x[pick]), y[pick]).backward()
                opt.step()
            sched.step()
            if on_epoch is not None:
                on_epoch(epoch + 1, arch.epochs)
    module.eval()
    meta = {
        "name": name,
        "version": arch.version,
        "seed": seed,
        "val_accuracy": accuracy(module, split.x_val, split.y_val),
        "test_accuracy": accuracy(module, split.x_test, split.y_test),
        "train_accuracy": accuracy(module, split.x_train, split.y_train),
        "epochs": arch.epochs,
        "train_seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
        "torch": torch.__version__,
    }
    return module, meta


# --- the demo model object and its cache ------------------------------------------------------


@dataclass
class DemoModel:
    """A trained demo model ready to serve: eval-mode module, metadata and a LayerTap.

    The tap reads the penultimate layer and :data:`DETECTOR_LAYERS` (what the demo server,
    the reference publication and the simulator publish).
    """

    name: str
    version: str
    module: nn.Module
    val_accuracy: float
    test_accuracy: float
    seed: int = 0
    path: Path | None = None
    meta: dict = field(default_factory=dict)
    tap: LayerTap = field(init=False)

    def __post_init__(self) -> None:
        self.module.eval()
        self.tap = LayerTap(self.module, list(DETECTOR_LAYERS.get(self.name, ())))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def input_shape(self) -> tuple[int, ...]:
        return IMAGE_SHAPE

    def predict(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(softmax probabilities (n, 10) float32, {"penultimate": (n, dim), shallow, middle}) for (n, 1, 8, 8)."""
        result = self.tap.tap(x, output_fn=lambda logits: torch.softmax(logits, dim=1))
        return result.outputs, result.layers

    def layer_names(self) -> list[str]:
        """Tappable layers shallow -> deep (see :func:`layer_names`)."""
        return layer_names(self.name)

    def weights_hash(self) -> str:
        """sha256 of the state dict's tensors (names, shapes, bytes): identifies the weights."""
        return weights_hash(self.module)


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and raw bytes), in key order."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def model_paths(state_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(<state_dir>/models/<name>.pt, <state_dir>/models/<name>.json)."""
    base = Path(state_dir) / "models"
    return base / f"{name}.pt", base / f"{name}.json"


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(state_dir: str | os.PathLike, name: str, module: nn.Module, meta: dict) -> Path:
    """Write the state dict (.pt) and its JSON metadata atomically; returns the .pt path."""
    import io

    pt, js = model_paths(state_dir, name)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    _atomic_write(pt, buf.getvalue())
    meta = dict(meta, sha256=_sha256_file(pt))
    _atomic_write(js, json.dumps(meta, indent=2, sort_keys=True).encode())
    return pt


def _load_cached(state_dir: str | os.PathLike, name: str, seed: int, device: torch.device) -> DemoModel | None:
    pt, js = model_paths(state_dir, name)
    if not (pt.exists() and js.exists()):
        return None
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    arch = ARCHITECTURES[name]
    if meta.get("version") != arch.version or meta.get("seed") != seed or meta.get("sha256") != _sha256_file(pt):
        return None
    module = arch.build()
    module.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    module.to(device).eval()
    return DemoModel(
        name=name,
        version=meta["version"],
        module=module,
        val_accuracy=float(meta["val_accuracy"]),
        test_accuracy=float(meta.get("test_accuracy", float("nan"))),
        seed=seed,
        path=pt,
        meta=meta,
    )


def load_demo_models(
    state_dir: str | os.PathLike = DEFAULT_STATE_DIR,
    names: Iterable[str] | None = None,
    progress: bool = True,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, DemoModel]:
    """Load the cached demo models, training (and caching) the missing or stale ones.

    Returns {name: DemoModel} in the order asked (default: cnn, resnet, mlp).
    """
    names = list(names) if names is not None else list(MODEL_NAMES)
    for name in names:
        _check_name(name)
    device = torch.device(device) if device is not None else default_device()
    models: dict[str, DemoModel] = {}
    missing = []
    for name in names:
        cached = _load_cached(state_dir, name, seed, device)
        if cached is None:
            missing.append(name)
        else:
            models[name] = cached
    if missing:
        with progress_bar(progress) as bar:
            for name in missing:
                task = bar.add_task(f"training {name}", total=ARCHITECTURES[name].epochs)
                module, meta = train_model(
                    name, seed=seed, device=device, on_epoch=lambda done, _total, task=task: bar.update(task, completed=done)
                )
                pt = save_model(state_dir, name, module, meta)
                meta = json.loads(model_paths(state_dir, name)[1].read_text())
                models[name] = DemoModel(
                    name=name,
                    version=meta["version"],
                    module=module,
                    val_accuracy=meta["val_accuracy"],
                    test_accuracy=meta["test_accuracy"],
                    seed=seed,
                    path=pt,
                    meta=meta,
                )
    return {name: models[name] for name in names}



