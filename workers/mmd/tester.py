"""``MMDTester``: the facade of the MMD engine (reference state, caches, API).

The maths lives in :mod:`workers.mmd.kernels`; this module keeps what is frozen per
reference (standardisation, bandwidths, the centred reference kernel block) and the
caches that make a stream of windows cheap:

* per window size ``n``: the permutation assignment matrix ``A`` and the
  reference-only part ``a_xᵀ K_xx a_x`` of every permutation's quadratic form, so a
  window costs only the products with its own kernel columns,
  ``2·(n_ref + n)·n·P`` flops instead of ``2·(n_ref + n)²·P``;
* per LADIS subsample size: the pair-weight matrix ``W`` of the shared
  permutations (see :meth:`MMDTester.detection_rate`);
* the last window's kernel blocks, so ``detection_rate``, ``test`` and ``scores``
  on the same window compute its kernels once.

Every random draw comes from a ``torch.Generator``: with an integer ``seed`` each
call derives its generator from (seed, purpose, sizes), so the same inputs give the
same results in any order of calls and after a restart; with a ``torch.Generator``
the draws advance that generator.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import kernels as km
from .results import CombinedTest, DetectionRateResult, ScoresResult, TestResult

__all__ = ["MMDTester"]

_SINGLE = "_"  # layer name used internally for an array reference
_ME_REG = 1e-8  # variance regulariser of the ME statistic
_MEDIAN_ROWS = 2048  # at most this many reference rows for the median heuristic


@dataclass
class _Layer:
    """What is frozen per reference layer."""

    x: torch.Tensor  # standardised reference (n_ref, d), compute dtype, on device
    x_sqnorm: torch.Tensor
    mean: torch.Tensor | None
    scale: torch.Tensor | None
    bandwidth: float  # median heuristic (or given)
    bandwidths: tuple[float, ...]  # bandwidth × multipliers
    center: float  # c: mean off-diagonal reference kernel
    kc_xx: torch.Tensor  # K_xx − c, zero diagonal
    row_xx: torch.Tensor  # kc_xx row sums
    total_xx: float  # kc_xx sum (float64)


@dataclass
class _WindowLayer:
    kc_xy: torch.Tensor  # K(x_ref, y) − c, (n_ref, n)
    kc_yy: torch.Tensor  # K(y, y) − c, zero diagonal, (n, n)


@dataclass
class _Permutations:
    assignments: torch.Tensor  # (n_ref + n, 1 + P), column 0 observed
    q_xx: torch.Tensor  # (L, 1 + P): a_xᵀ kc_xx a_x per layer


@dataclass
class _SubsampleDesign:
    assignments: torch.Tensor  # (m_r + m_w, 1 + P), column 0 observed
    weights: torch.Tensor  # (T, 1 + P) pair weights
    rr_flat: torch.Tensor  # pairs i < j of the reference rows, as i * m_r + j
    ww_flat: torch.Tensor  # pairs i < j of the window rows, as i * m_w + j


def _to_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError("compute dtype must be float32 or float64 (inputs may be float16/bfloat16)")
    return dtype


def _subsample(repeats: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``repeats`` rows of ``m`` distinct indices of ``range(n)`` (uniform subsets)."""
    if m >= n:
        return torch.arange(n).expand(repeats, n).clone()
    return torch.rand(repeats, n, generator=gen).topk(m, dim=1, sorted=False).indices


def _tag(text: str) -> int:
    return zlib.crc32(text.encode())


class _Shared:
    """What does not depend on the reference, shared by every tester of a process.

    The permutation assignments and the LADIS pair-weight matrix ``W`` depend only on the
    sizes, P and the seed (tens of MB each at m = 100, P = 500): one copy for all the
    models of a worker instead of one per tester. The largest work buffers are per thread
    (a tester runs in one thread at a time; two threads may test two models at once).
    """

    def __init__(self, capacity: int = 8) -> None:
        self.lock = threading.Lock()
        self.capacity = capacity
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.local = threading.local()

    def get(self, key: tuple, build: Any) -> Any:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        value = build()
        with self.lock:
            value = self.items.setdefault(key, value)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return value

    def buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffers = self.local.__dict__.setdefault("buffers", {})
        key = (name, dtype, str(device))
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_SHARED = _Shared()


class MMDTester:
    """Kernel two-sample tests of windows against a frozen reference.

    Gaussian RBF kernel on squared distances (GEMM expansion, clamped at 0), bandwidth
    from the median heuristic on the reference — computed once and frozen, so every
    window is tested with the same kernel. The defaults are LADIS's recipe, chosen
    by ``bench/detection.py`` (docs/detection.md): features standardised by the
    reference mean/sd (``standardize=True``) and the mean of five bandwidths, median
    × 2^f for f = −2…2 (``bandwidth_multipliers=LADIS_MULTIPLIERS``); the engine's
    former setting is ``standardize=False, bandwidth_multipliers=MEDIAN_ONLY``.
    Unbiased MMD² (U-statistic, unequal sizes allowed) or the biased V-statistic
    (``unbiased=False``). Several layers are combined by ``combine`` (default
    ``minp``: the smallest per-layer permutation p-value, ranked against the same
    minima of the permuted splits; see :func:`workers.mmd.kernels.combine_layers`).

    Permutation p-values are ``(1 + #{stat_b ≥ observed}) / (1 + P)``; all P
    permutations are evaluated together as matrix products on a kernel computed
    once (see :mod:`workers.mmd.kernels`).

    Args:
        reference: ``(n, d)`` numpy array or tensor, or a dict layer name → array
            (all layers with the same n rows; the windows then are dicts too).
        n_permutations: P.
        seed: int (reproducible per call), ``torch.Generator``, or None (random).
        device: torch device; default ``cuda`` when available, else ``cpu``.
        bandwidth_multipliers: multipliers of the median bandwidth (kernel = mean).
        bandwidth: fixed bandwidth σ (float, or dict per layer) instead of the median.
        standardize: standardise features by the reference mean/sd.
        combine: multi-layer combination, ``minp`` (default), ``fisher``, ``max`` or ``sum``.
        reference_classes: predicted class of each reference row, for the
            class-mix adjustment of :meth:`detection_rate`.
        dtype: compute dtype, float32 (default) or float64; inputs may be
            float16/bfloat16/float32/float64.
        unbiased: U-statistic (default) or V-statistic.
        max_chunk_bytes: bound on the permutation work buffers.

    Example:
        >>> import numpy as np
        >>> from workers.mmd import MMDTester
        >>> rng = np.random.default_rng(0)
        >>> tester = MMDTester(rng.normal(size=(300, 16)), n_permutations=200, seed=0, device="cpu")
        >>> clean = tester.test(rng.normal(size=(100, 16)))
        >>> attacked = tester.test(rng.normal(size=(100, 16)) + 0.5)
        >>> bool(clean.p_value > 0.05), bool(attacked.p_value <= 0.05)
        (True, True)
        >>> rate = tester.detection_rate(rng.normal(size=(100, 16)) + 0.5, repeats=20, m=50)
        >>> bool(rate.rate > 0.5)
        True
        >>> top = tester.scores(np.vstack([rng.normal(size=(95, 16)), rng.normal(size=(5, 16)) + 4.0]), k=5)
        >>> sorted(top.indices.tolist())
        [95, 96, 97, 98, 99]
    """

    def __init__(
        self,
        reference: Any,
        n_permutations: int = 500,
        seed: int | torch.Generator | None = 0,
        device: str | torch.device | None = None,
        *,
        bandwidth_multipliers: Sequence[float] = km.DEFAULT_MULTIPLIERS,
        bandwidth: float | Mapping[str, float] | None = None,
        standardize: bool = True,
        combine: str = km.DEFAULT_COMBINATION,
        reference_classes: Any = None,
        dtype: torch.dtype | str | None = None,
        unbiased: bool = True,
        max_chunk_bytes: int = 64 << 20,
    ) -> None:
        if n_permutations < 1:
            raise ValueError("n_permutations must be >= 1")
        self.device = km.pick_device(device)
        self.dtype = _to_dtype(dtype)
        self.n_permutations = int(n_permutations)
        self.unbiased = bool(unbiased)
        self.standardize = bool(standardize)
        if combine not in km.COMBINATIONS:
            raise ValueError(f"unknown combination {combine!r}: use one of {', '.join(km.COMBINATIONS)}")
        self.combine = combine
        self.bandwidth_multipliers = tuple(float(m) for m in bandwidth_multipliers)
        self.max_chunk_bytes = int(max_chunk_bytes)
        if isinstance(seed, torch.Generator):
            self._generator_obj: torch.Generator | None = seed
            self._seed = 0
        else:
            self._generator_obj = None
            self._seed = int(seed) if seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
        self._lock = threading.RLock()
        self._multi = isinstance(reference, Mapping)
        refs = dict(reference) if self._multi else {_SINGLE: reference}
        if not refs:
            raise ValueError("empty reference dict")
        self._layers: dict[str, _Layer] = {}
        n_ref = None
        for name, ref in refs.items():
            fixed = bandwidth.get(name) if isinstance(bandwidth, Mapping) else bandwidth
            layer = self._fit_layer(name, ref, fixed)
            if n_ref is not None and layer.x.shape[0] != n_ref:
                raise ValueError("all reference layers must have the same number of rows")
            n_ref = layer.x.shape[0]
            self._layers[name] = layer
        self.n_reference = int(n_ref)
        if self.n_reference < 2:
            raise ValueError("the reference needs at least 2 rows")
        self.reference_classes = None
        if reference_classes is not None:
            rc = torch.as_tensor(np.asarray(reference_classes)).long().reshape(-1)
            if rc.numel() != self.n_reference:
                raise ValueError("reference_classes must have one entry per reference row")
            self.reference_classes = rc.to(self.device)
        self._perm_cache: OrderedDict[tuple, _Permutations] = OrderedDict()
        self._design_cache: OrderedDict[tuple, _SubsampleDesign] = OrderedDict()
        self._rr_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # reference-pairs part of the rate
        self._window_key: list[torch.Tensor] | None = None
        self._window_val: dict[str, _WindowLayer] | None = None
        self._window_buffer: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        me_gen = self._generator("me-pairs", self.n_reference)
        self._me_reference_order = torch.randperm(self.n_reference, generator=me_gen).to(self.device)

    # ------------------------------------------------------------------ setup
    def _generator(self, purpose: str, *sizes: int, seed: int | None = None) -> torch.Generator:
        if seed is None and self._generator_obj is not None:
            return self._generator_obj
        base = self._seed if seed is None else int(seed)
        state = np.random.SeedSequence([base, _tag(purpose), *[int(s) for s in sizes]]).generate_state(2)
        g = torch.Generator()
        g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
        return g

    def _as_tensor(self, data: Any) -> torch.Tensor:
        t = data.detach() if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
        if t.ndim != 2:
            raise ValueError(f"expected a 2-d (n, d) array, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            t = t.to(torch.float32)
        return t.to(device=self.device, dtype=self.dtype)

    def _fit_layer(self, name: str, ref: Any, fixed: float | None) -> _Layer:
        x = self._as_tensor(ref)
        mean = scale = None
        if self.standardize:
            x64 = x.double()
            mean = x64.mean(0)
            sd = x64.std(0) if x.shape[0] > 1 else torch.ones_like(mean)
            scale = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
            x = ((x64 - mean) / scale).to(self.dtype)
            mean, scale = mean.to(self.dtype), scale.to(self.dtype)
        x = x.contiguous()
        x_sqnorm = (x * x).sum(-1)
        d_xx = km.squared_pairwise_distance(x, x_sqnorm=x_sqnorm)
        if fixed is not None:
            bw = float(fixed)
        else:
            n = x.shape[0]
            if n > _MEDIAN_ROWS:
                idx = torch.randperm(n, generator=self._generator("median", n, _tag(name)))[:_MEDIAN_ROWS].to(self.device)
                bw = km.median_heuristic(d_xx[idx][:, idx])
            else:
                bw = km.median_heuristic(d_xx)
        bandwidths = tuple(bw * m for m in self.bandwidth_multipliers)
        k_xx = km.rbf_kernel(d_xx, bandwidths)
        del d_xx
        n = k_xx.shape[0]
        total = km._sum64(k_xx) - n  # diagonal is exactly 1
        center = float(total / max(1, n * (n - 1)))
        k_xx.sub_(center).fill_diagonal_(0.0)  # in place: kc_xx
        return _Layer(
            x=x,
            x_sqnorm=x_sqnorm,
            mean=mean,
            scale=scale,
            bandwidth=bw,
            bandwidths=bandwidths,
            center=center,
            kc_xx=k_xx,
            row_xx=k_xx.sum(1),
            total_xx=km._sum64(k_xx),
        )

    # ------------------------------------------------------------ properties
    @property
    def bandwidth(self) -> float | dict[str, float]:
        """Frozen median-heuristic bandwidth σ (dict per layer for a dict reference)."""
        if self._multi:
            return {k: v.bandwidth for k, v in self._layers.items()}
        return self._layers[_SINGLE].bandwidth

    @property
    def bandwidths(self) -> tuple[float, ...] | dict[str, tuple[float, ...]]:
        """All bandwidths of the kernel (σ × multipliers)."""
        if self._multi:
            return {k: v.bandwidths for k, v in self._layers.items()}
        return self._layers[_SINGLE].bandwidths

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers) if self._multi else []

    def __repr__(self) -> str:
        return (
            f"MMDTester(n_reference={self.n_reference}, layers={self.layer_names or 1}, "
            f"P={self.n_permutations}, bandwidth={self.bandwidth}, multipliers={self.bandwidth_multipliers}, "
            f"standardize={self.standardize}, combine={self.combine}, device={self.device}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------- window state
    def _window_tensors(self, window: Any) -> dict[str, torch.Tensor]:
        if self._multi:
            if not isinstance(window, Mapping):
                raise TypeError("the reference is a dict of layers: pass the window as a dict too")
            missing = set(self._layers) - set(window)
            if missing:
                raise KeyError(f"window lacks layers {sorted(missing)}")
            ys = {k: self._as_tensor(window[k]) for k in self._layers}
        else:
            if isinstance(window, Mapping):
                raise TypeError("the reference is one array: pass the window as one array")
            ys = {_SINGLE: self._as_tensor(window)}
        n = None
        for k, y in ys.items():
            if y.shape[1] != self._layers[k].x.shape[1]:
                raise ValueError(f"layer {k!r}: window has {y.shape[1]} features, reference {self._layers[k].x.shape[1]}")
            if n is not None and y.shape[0] != n:
                raise ValueError("all window layers must have the same number of rows")
            n = y.shape[0]
        if n is None or n < 2:
            raise ValueError("a window needs at least 2 rows")
        return ys

    def _buffer(self, name: str, shape: tuple[int, ...], shared: bool = False) -> torch.Tensor:
        """A reusable work buffer (no allocation, hence no page faults, per window); ``shared``: one per thread
        for all testers (the large ones, whose contents do not outlive the call)."""
        numel = int(np.prod(shape))
        if shared:
            return _SHARED.buffer(name, numel, self.dtype, self.device).view(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def _window(self, window: Any) -> tuple[dict[str, _WindowLayer], int]:
        """Kernel blocks of a window, ``K(x_ref, y) − c`` and ``K(y, y) − c`` per layer.

        They are written into one reused buffer ``(L, n_ref + n, n)`` (reference rows
        first), so :meth:`test` multiplies it by the permutations without a copy;
        the last window's blocks are kept for the next call on the same data.
        """
        ys = self._window_tensors(window)
        key = list(ys.values())
        if (
            self._window_key is not None
            and len(key) == len(self._window_key)
            and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(key, self._window_key))
        ):
            return self._window_val, key[0].shape[0]
        self._window_key = self._window_val = None  # the buffer is about to be overwritten
        n, n_x = key[0].shape[0], self.n_reference
        buf = self._buffer("kc_y", (len(ys), n_x + n, n))
        out: dict[str, _WindowLayer] = {}
        for i, (name, y) in enumerate(ys.items()):
            layer = self._layers[name]
            if layer.mean is not None:
                y = (y - layer.mean) / layer.scale
            y_sqnorm = (y * y).sum(-1)
            kc_xy, kc_yy = buf[i, :n_x], buf[i, n_x:]
            km.squared_pairwise_distance(layer.x, y, x_sqnorm=layer.x_sqnorm, y_sqnorm=y_sqnorm, out=kc_xy)
            km.squared_pairwise_distance(y, x_sqnorm=y_sqnorm, out=kc_yy)
            for block in (kc_xy, kc_yy):
                k = km.rbf_kernel(block, layer.bandwidths, inplace=True)
                if k.data_ptr() != block.data_ptr():
                    block.copy_(k)
                block.sub_(layer.center)
            kc_yy.fill_diagonal_(0.0)
            out[name] = _WindowLayer(kc_xy=kc_xy, kc_yy=kc_yy)
        self._window_key, self._window_val = [t.clone() for t in key], out
        self._window_buffer = buf
        return out, n

    # ------------------------------------------------------------ permutations
    def _permutations(self, n: int) -> _Permutations:
        key = (n, self.n_permutations)
        hit = self._perm_cache.get(key)
        if hit is not None:
            self._perm_cache.move_to_end(key)
            return hit
        n_x = self.n_reference

        def build() -> torch.Tensor:
            gen = self._generator("permutations", n_x, n, self.n_permutations)
            return km.permutation_assignments(n_x, n, self.n_permutations, gen, dtype=self.dtype, device=self.device)

        a = build() if self._generator_obj is not None else _SHARED.get(
            ("permutations", self._seed, n_x, n, self.n_permutations, self.dtype, str(self.device)), build)
        a_x = a[:n_x]
        q_xx = torch.empty(len(self._layers), a.shape[1], dtype=self.dtype, device=self.device)
        chunks = km._column_chunks(n_x, a.shape[1], a.element_size(), self.max_chunk_bytes)
        for i, layer in enumerate(self._layers.values()):
            for sl in chunks:
                block = a_x[:, sl]
                q_xx[i, sl] = (torch.mm(layer.kc_xx, block) * block).sum(0)
        perms = _Permutations(assignments=a, q_xx=q_xx)
        self._perm_cache[key] = perms
        while len(self._perm_cache) > 4:
            self._perm_cache.popitem(last=False)
        return perms

    def assignments(self, n_window: int) -> np.ndarray:
        """The permutation splits used for windows of ``n_window`` rows, ``(n_ref + n, P)`` bool.

        Row i of the pooled sample ``[reference; window]`` is in the window group of
        permutation b when the entry is True (the observed split is not included).
        """
        with self._lock, torch.no_grad():
            return km.as_numpy(self._permutations(int(n_window)).assignments[:, 1:]) > 0.5

    def _constant(self, layer: _Layer, n_x: int, n_y: int) -> float:
        # V-statistic: i = j terms (k = 1) plus the centring correction; U-statistic: 0.
        return 0.0 if self.unbiased else (1.0 - layer.center) * (1.0 / n_x + 1.0 / n_y)

    # ------------------------------------------------------------------- test
    def test(self, window: Any) -> TestResult:
        """Permutation two-sample test of ``window`` against the reference.

        Returns MMD² (float64 sums), the p-value with P permutations, and for a dict
        of layers per-layer results plus the combined test (the tester's ``combine``
        method over the same permutations; the p-values of the other methods too).
        """
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            ctx = self._test_prepare(window)
            return self._test_finish(ctx, self._test_forms(ctx), t0)

    def _test_prepare(self, window: Any) -> dict[str, Any]:
        """The window's kernel blocks and the permutations of its size (the test's inputs)."""
        wins, n = self._window(window)
        perms = self._permutations(n)
        n_tot = self.n_reference + n
        kc_y = self._window_buffer.view(len(self._layers) * n_tot, n)  # [K_xy; K_yy] − c of every layer
        return {"wins": wins, "n": n, "perms": perms, "kc_y": kc_y}

    def _test_forms(self, ctx: dict[str, Any]) -> torch.Tensor:
        """``a_bᵀ K a_b`` of every layer and permutation b, ``(L, 1 + P)``."""
        a = ctx["perms"].assignments
        kc_y, n_x, n = ctx["kc_y"], self.n_reference, ctx["n"]
        n_layers, n_tot = len(self._layers), n_x + n
        q = ctx["perms"].q_xx.clone()
        a_y = a[n_x:]
        width = km._column_chunks(n_layers * n_tot, a.shape[1], a.element_size(), self.max_chunk_bytes)[0].stop
        g_buf = self._buffer("g", (n_layers * n_tot * width,), shared=True)
        for sl in km._column_chunks(n_layers * n_tot, a.shape[1], a.element_size(), self.max_chunk_bytes):
            w = sl.stop - sl.start
            g = torch.mm(kc_y, a_y[:, sl], out=g_buf[: n_layers * n_tot * w].view(n_layers * n_tot, w))
            g = g.view(n_layers, n_tot, w).mul_(a[:, sl])  # A ∘ (K A_y), per layer
            q[:, sl] += 2.0 * g[:, :n_x].sum(1) + g[:, n_x:].sum(1)
        return q

    def _test_finish(self, ctx: dict[str, Any], q: torch.Tensor, t0: float) -> TestResult:
        """Statistics, p-values and the combined test from the quadratic forms ``q``."""
        wins, n, perms = ctx["wins"], ctx["n"], ctx["perms"]
        n_x = self.n_reference
        a = perms.assignments
        a_x, a_y = a[:n_x], a[n_x:]
        names = list(self._layers)
        n_layers = len(names)
        stats = torch.empty(n_layers, a.shape[1], dtype=torch.float64, device=self.device)
        observed = []
        c_xx, c_yy, c_xy = km.mmd_coefficients(n_x, n, self.unbiased)
        for i, k in enumerate(names):
            layer, win = self._layers[k], wins[k]
            row_xy, row_yy = win.kc_xy.sum(1), win.kc_yy.sum(1)
            r_x = layer.row_xx + row_xy
            r_y = win.kc_xy.sum(0) + row_yy
            s = r_x @ a_x + r_y @ a_y
            s_xy = float(row_xy.double().sum())
            s_yy = float(row_yy.double().sum())
            total = layer.total_xx + 2.0 * s_xy + s_yy
            const = self._constant(layer, n_x, n)
            stats[i] = km.mmd2_from_quadratic_forms(
                q[i], s, total, n_x, n, unbiased=self.unbiased, diagonal_term=const
            )
            observed.append(c_xx * layer.total_xx + c_yy * s_yy - 2.0 * c_xy * s_xy + const)
        p = km.permutation_p_value(stats)
        stats_np, p_np = km.as_numpy(stats), km.as_numpy(p)
        ms = (time.perf_counter() - t0) * 1e3
        per_layer = {
            k: TestResult(
                mmd2=float(observed[i]),
                p_value=float(p_np[i]),
                n_reference=n_x,
                n_window=n,
                n_permutations=self.n_permutations,
                unbiased=self.unbiased,
                null=stats_np[i, 1:].copy(),
                compute_ms=ms,
            )
            for i, k in enumerate(names)
        }
        if not self._multi:
            return per_layer[_SINGLE]
        combos = km.combine_layers_all(stats)
        p_all = {method: float(km.permutation_p_value(c)) for method, c in combos.items()}
        p_comb = p_all[self.combine]
        z_np = km.as_numpy(combos[self.combine])
        z_layers = km.as_numpy(km.standardize_by_null(stats)[:, 0])
        combined = CombinedTest(
            statistic=float(z_np[0]),
            p_value=p_comb,
            layer_z={k: float(z_layers[i]) for i, k in enumerate(names)},
            method=self.combine,
            p_values=p_all,
        )
        return TestResult(
            mmd2=float(sum(observed)),
            p_value=p_comb,
            n_reference=n_x,
            n_window=n,
            n_permutations=self.n_permutations,
            unbiased=self.unbiased,
            null=z_np[1:].copy(),
            layers=per_layer,
            combined=combined,
            compute_ms=(time.perf_counter() - t0) * 1e3,
        )

    # --------------------------------------------------------- detection rate
    def _design(self, m_r: int, m_w: int) -> _SubsampleDesign:
        key = (m_r, m_w, self.n_permutations)
        hit = self._design_cache.get(key)
        if hit is not None:
            self._design_cache.move_to_end(key)
            return hit
        if self._generator_obj is None:  # the same for every tester of this seed: one copy per process
            design = _SHARED.get(("design", self._seed, m_r, m_w, self.n_permutations, self.dtype, str(self.device),
                                  self.unbiased), lambda: self._build_design(m_r, m_w))
        else:
            design = self._build_design(m_r, m_w)
        self._design_cache[key] = design
        while len(self._design_cache) > 4:
            self._design_cache.popitem(last=False)
        return design

    def _build_design(self, m_r: int, m_w: int) -> _SubsampleDesign:
        gen = self._generator("ladis-permutations", m_r, m_w, self.n_permutations)
        a = km.permutation_assignments(m_r, m_w, self.n_permutations, gen, dtype=self.dtype, device=self.device)
        dev = self.device
        rr = torch.triu_indices(m_r, m_r, 1, device=dev)
        ww = torch.triu_indices(m_w, m_w, 1, device=dev)
        rw_i = torch.arange(m_r, device=dev).repeat_interleave(m_w)
        rw_j = torch.arange(m_w, device=dev).repeat(m_r)
        rows = torch.cat([rr[0], rw_i, m_r + ww[0]])
        cols = torch.cat([rr[1], m_r + rw_j, m_r + ww[1]])
        weights = km.pair_weights(a, m_r, m_w, unbiased=self.unbiased, rows=rows, cols=cols)
        return _SubsampleDesign(
            assignments=a, weights=weights, rr_flat=rr[0] * m_r + rr[1], ww_flat=ww[0] * m_w + ww[1]
        )

    def subsample_assignments(self, m_reference: int, m_window: int) -> np.ndarray:
        """The permutation splits shared by the repeats of :meth:`detection_rate`.

        ``(m_reference + m_window, P)`` bool, True = window group; the pooled order
        of a repeat is its reference rows, then its window rows.
        """
        with self._lock, torch.no_grad():
            return km.as_numpy(self._design(int(m_reference), int(m_window)).assignments[:, 1:]) > 0.5

    def _class_matched(self, iw: torch.Tensor, window_classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Reference rows matching, slot by slot, the predicted class of ``iw``'s rows.

        Within a repeat the rows of one class are drawn without replacement from a
        random order of the reference rows of that class (wrapping around if the
        class is rarer in the reference than in the subsample); a class absent from
        the reference draws uniformly from the whole reference.
        """
        rc = self.reference_classes
        repeats, m_w = iw.shape
        n_x = self.n_reference
        universe, inverse = torch.unique(torch.cat([rc, window_classes]), return_inverse=True)
        rc_code, wc_all = inverse[:n_x], inverse[n_x:]
        wc = wc_all[iw]  # (R, m_w)
        counts = torch.bincount(rc_code, minlength=universe.numel())
        start = torch.cumsum(counts, 0) - counts
        keys = torch.rand(repeats, n_x, generator=gen, dtype=torch.float64).to(self.device) + rc_code.double()
        order = keys.argsort(dim=1)  # grouped by class, random within class
        sorted_wc, perm = wc.sort(dim=1, stable=True)
        first = torch.searchsorted(sorted_wc.contiguous(), sorted_wc.contiguous(), right=False)
        occ = torch.empty_like(perm)
        occ.scatter_(1, perm, torch.arange(m_w, device=self.device).expand(repeats, m_w) - first)
        cnt = counts[wc]
        slot = start[wc] + occ % cnt.clamp_min(1)
        ir = order.gather(1, slot.clamp_max(n_x - 1))
        fallback = torch.randint(0, n_x, (repeats, m_w), generator=gen).to(self.device)
        return torch.where(cnt > 0, ir, fallback)

    def detection_rate(
        self,
        window: Any,
        repeats: int = 100,
        m: int = 100,
        alpha: float = 0.05,
        *,
        window_classes: Any = None,
        shift_adjust: bool | None = None,
        seed: int | None = None,
    ) -> DetectionRateResult:
        """LADIS detection rate: fraction of ``repeats`` subsample tests with p ≤ ``alpha``.

        Each repeat draws ``min(m, n_ref)`` reference rows and ``min(m, n_window)``
        window rows without replacement (a window smaller than m is used whole) and
        runs the permutation test with the tester's P. All repeats, layers and
        permutations are one GEMM: each repeat's centred kernel entries of the pairs
        ``i < j`` (gathered from the cached blocks, ``(R, T)``) times the pair-weight
        matrix ``W (T, 1+P)`` of the permutations. The permutations are shared by
        all repeats (and cached per size): each repeat's permutations are still
        independent of its data, so each repeat is a valid test; only the dependence
        between repeats changes, which the rate (a mean) does not need.

        ``shift_adjust`` (default: on when both ``reference_classes`` and
        ``window_classes`` are known) draws the reference rows with the predicted-class
        mix of each repeat's window rows (LADIS's shift_adjust; as many reference rows
        as window rows, matched class by class), so a change of class mix alone does
        not read as an attack. ``seed`` overrides the tester's seed.
        """
        t0 = time.perf_counter()
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if repeats < 1 or m < 2:
            raise ValueError("repeats must be >= 1 and m >= 2")
        with self._lock, torch.no_grad():
            ctx = self._rate_prepare(window, repeats, m, window_classes, shift_adjust, seed)
            prod = self._buffer("k_tri_w", (ctx["k"].shape[0], ctx["w"].shape[1]))
            return self._rate_finish(ctx, torch.mm(ctx["k"], ctx["w"], out=prod), alpha, t0)

    def _rate_prepare(self, window: Any, repeats: int, m: int, window_classes: Any, shift_adjust: bool | None,
                      seed: int | None) -> dict[str, Any]:
        """The repeats' subsamples and the rate's GEMM inputs: kernel entries ``k (L·R, T')`` times ``w (T', 1+P)``."""
        wins, n = self._window(window)
        n_x = self.n_reference
        wc = None
        if window_classes is not None:
            wc = torch.as_tensor(np.asarray(window_classes)).long().reshape(-1).to(self.device)
            if wc.numel() != n:
                raise ValueError("window_classes must have one entry per window row")
        if shift_adjust is None:
            shift_adjust = wc is not None and self.reference_classes is not None
        if shift_adjust and (wc is None or self.reference_classes is None):
            raise ValueError("shift_adjust needs reference_classes (constructor) and window_classes")
        m_w = min(m, n)
        m_r = m_w if shift_adjust else min(m, n_x)
        gen = self._generator("ladis-subsamples", n_x, n, repeats, m, int(bool(shift_adjust)), seed=seed)
        iw = _subsample(repeats, n, m_w, gen).to(self.device)
        if shift_adjust:
            ir = self._class_matched(iw, wc, gen)
        else:
            ir = _subsample(repeats, n_x, m_r, gen).to(self.device)
        # ascending rows within a repeat: the same subsets, cache-friendly gathers
        ir, iw = ir.sort(1).values, iw.sort(1).values
        design = self._design(m_r, m_w)
        rr_flat, ww_flat = design.rr_flat, design.ww_flat
        n_rr, n_rw = rr_flat.numel(), m_r * m_w
        ir_r, ir_c, iw_r, iw_c = ir.unsqueeze(2), ir.unsqueeze(1), iw.unsqueeze(2), iw.unsqueeze(1)
        dup_rr = None
        if shift_adjust:  # class-matched draws may repeat a reference row
            dup_rr = (ir_r == ir_c).view(repeats, -1).index_select(1, rr_flat)
            dup_rr = dup_rr if bool(dup_rr.any()) else None
        names = list(self._layers)
        n_layers = len(names)
        # Without shift_adjust the reference subsamples depend on the sizes and the seed only, not on the
        # window: the reference-pairs part of the product, k_rr @ W_rr (a quarter of the work at m_r = m_w),
        # is the same for every window of this size and is computed once.
        fixed = not shift_adjust and self._generator_obj is None
        rr_key = (n, repeats, m, m_r, m_w, seed)
        base = self._rr_cache.get(rr_key) if fixed else None
        if base is not None and not torch.equal(base[0], ir):
            base = None
        first = n_rr if base is not None else 0
        k_tri = self._buffer("k_tri", (n_layers * repeats, design.weights.shape[0] - first), shared=True)
        for i, k in enumerate(names):
            layer, win = self._layers[k], wins[k]
            rows = slice(i * repeats, (i + 1) * repeats)
            if base is None:
                # (R, m, m) sub-blocks by broadcast indexing, then the pairs i < j.
                block = layer.kc_xx[ir_r, ir_c].view(repeats, -1).index_select(1, rr_flat)
                if dup_rr is not None:
                    block = torch.where(dup_rr, torch.full_like(block, 1.0 - layer.center), block)
                k_tri[rows, :n_rr] = block
            k_tri[rows, n_rr - first : n_rr - first + n_rw] = win.kc_xy[ir_r, iw_c].view(repeats, -1)
            k_tri[rows, n_rr - first + n_rw :] = win.kc_yy[iw_r, iw_c].view(repeats, -1).index_select(1, ww_flat)
        if fixed and base is None:
            self._rr_cache[rr_key] = (ir, torch.mm(k_tri[:, :n_rr], design.weights[:n_rr]))
            while len(self._rr_cache) > 4:
                self._rr_cache.pop(next(iter(self._rr_cache)))
        return {"k": k_tri, "w": design.weights[first:], "base": base[1] if base is not None else None,
                "design": design, "repeats": repeats, "m_r": m_r, "m_w": m_w, "ir": ir, "iw": iw,
                "shift_adjust": bool(shift_adjust)}

    def _rate_finish(self, ctx: dict[str, Any], raw: torch.Tensor, alpha: float, t0: float) -> DetectionRateResult:
        """Rates and p-values from the GEMM's output ``raw = k @ w`` (plus the cached reference part), ``(L·R, 1 + P)``."""
        repeats, m_r, m_w, ir, iw = ctx["repeats"], ctx["m_r"], ctx["m_w"], ctx["ir"], ctx["iw"]
        shift_adjust = ctx["shift_adjust"]
        names = list(self._layers)
        n_layers = len(names)
        if ctx["base"] is not None:
            raw = raw + ctx["base"]
        stats = raw.double().view(n_layers, repeats, -1)
        consts = torch.tensor(
            [self._constant(self._layers[k], m_r, m_w) for k in names], dtype=torch.float64, device=self.device
        )
        stats += consts.view(-1, 1, 1)
        p = km.permutation_p_value(stats)  # (L, R)
        p_np, mmd_np = km.as_numpy(p), km.as_numpy(stats[..., 0])
        ir_np, iw_np = km.as_numpy(ir), km.as_numpy(iw)
        ms = (time.perf_counter() - t0) * 1e3

        def result(pv: np.ndarray, mm: np.ndarray, layers: dict, st: torch.Tensor, **extra: Any
                   ) -> DetectionRateResult:
            return DetectionRateResult(
                rate=float(np.mean(pv <= alpha)),
                p_values=pv,
                mmd2=mm,
                alpha=float(alpha),
                repeats=int(repeats),
                m_reference=int(m_r),
                m_window=int(m_w),
                n_permutations=self.n_permutations,
                shift_adjusted=bool(shift_adjust),
                reference_indices=ir_np,
                window_indices=iw_np,
                layers=layers,
                compute_ms=ms,
                statistics=km.as_numpy(st),
                **extra,
            )

        per_layer = {k: result(p_np[i].copy(), mmd_np[i].copy(), {}, stats[i]) for i, k in enumerate(names)}
        if not self._multi:
            return per_layer[_SINGLE]
        combos = km.combine_layers_all(stats)  # (R, 1+P) each
        p_all = {method: km.as_numpy(km.permutation_p_value(c)) for method, c in combos.items()}
        return result(p_all[self.combine], mmd_np.sum(0), per_layer, combos[self.combine],
                      combinations=p_all, method=self.combine)

    # ----------------------------------------------------------------- scores
    def scores(self, window: Any, k: int = 100, *, by: str = "witness") -> ScoresResult:
        """Per-sample scores of every window row and the top-k (highest first).

        * witness: mean kernel to the other window rows minus mean kernel to the
          reference — the empirical MMD witness function at the sample, large when
          the sample sits where the window has more mass than the reference;
        * me_stat: the ME statistic of the LADIS code with test location t = the
          sample: ``n·mean(z)² / (var(z) + 1e-8)`` for ``z_j = k(x_j, t) − k(y_j, t)``,
          j over ``n = min(n_ref, n_window)`` pairs of a fixed random order of the
          reference rows and the window rows.

        Both come from the window's cached kernel blocks with the frozen bandwidth.
        ``by`` picks the ranking ("witness" or "me").
        """
        t0 = time.perf_counter()
        if by not in ("witness", "me"):
            raise ValueError("by must be 'witness' or 'me'")
        with self._lock, torch.no_grad():
            wins, n = self._window(window)
            n_x = self.n_reference
            n_pair = min(n_x, n)
            ref_rows = self._me_reference_order[:n_pair]
            k = max(0, min(int(k), n))
            per: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for name, win in wins.items():
                layer = self._layers[name]
                witness = win.kc_yy.sum(0) / (n - 1) - win.kc_xy.mean(0)
                # the same witness function at the reference rows: its clean scale
                ref_witness = win.kc_xy.sum(1) / n - layer.row_xx / (n_x - 1)
                z = win.kc_xy[ref_rows] - win.kc_yy[:n_pair]
                diag = torch.arange(n_pair, device=self.device)
                z[diag, diag] -= 1.0 - layer.center  # k(y_i, y_i) = 1
                z = z.double()
                me = n_pair * z.mean(0).square() / (z.var(0, unbiased=False) + _ME_REG)
                per[name] = (witness.double(), me, ref_witness.double())

            def ranked(witness: torch.Tensor, me: torch.Tensor, ref_witness: torch.Tensor, layers: dict
                       ) -> ScoresResult:
                key = witness if by == "witness" else me
                top = torch.topk(key, k)
                return ScoresResult(
                    indices=km.as_numpy(top.indices),
                    scores=km.as_numpy(top.values),
                    witness=km.as_numpy(witness),
                    me_stat=km.as_numpy(me),
                    by=by,
                    layers=layers,
                    compute_ms=(time.perf_counter() - t0) * 1e3,
                    reference_witness=km.as_numpy(ref_witness),
                )

            per_layer = {name: ranked(w, me, rw, {}) for name, (w, me, rw) in per.items()}
            if not self._multi:
                return per_layer[_SINGLE]
            # per layer, the window's witness z-scores (by the window's mean/sd), the same map on the reference rows
            wz = torch.zeros(n, dtype=torch.float64, device=self.device)
            rz = torch.zeros(n_x, dtype=torch.float64, device=self.device)
            for w, _, rw in per.values():
                mean, sd = w.mean(), w.std()
                sd = sd if float(sd) > 0 else torch.ones_like(sd)
                wz += (w - mean) / sd
                rz += (rw - mean) / sd
            me_sum = sum(me for _, me, _ in per.values())
            return ranked(wz, me_sum, rz, per_layer)

    # ------------------------------------------------------------------ all
    def analyze(
        self,
        window: Any,
        *,
        k: int = 100,
        repeats: int = 100,
        m: int = 100,
        alpha: float = 0.05,
        window_classes: Any = None,
    ) -> tuple[TestResult, DetectionRateResult, ScoresResult]:
        """``test``, ``detection_rate`` and ``scores`` of one window (kernels computed once)."""
        with self._lock:
            return (
                self.test(window),
                self.detection_rate(window, repeats=repeats, m=m, alpha=alpha, window_classes=window_classes),
                self.scores(window, k=k),
            )
