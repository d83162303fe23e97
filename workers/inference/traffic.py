"""Demo traffic: the clean reference, and simulated production traffic with attack phases.

- :func:`publish_reference` publishes each demo model's outputs and layers on the
  **validation** split as ``role="reference"`` batches (the drift agent's clean reference).
- :func:`simulate` drives the model server over HTTP (or publishes directly with
  ``via="publisher"``) through phases such as ``"clean:60,pgd:30,clean:30,fgsm:30"``
  (name:seconds) at a fixed total rate in events per second, sent as small request
  batches paced by a monotonic clock. Clean phases draw inputs from the **test** split;
  an attack phase sends the cached adversarial versions of test inputs crafted against
  the model each request goes to (``"pgd@cnn:30"`` attacks only ``cnn``, the other models
  keep receiving clean traffic). Normal clients share the traffic with one probing
  client that sends one test image plus tiny noise over and over (seed 003's
  "many highly similar but nonidentical inputs"). Ground truth travels with the
  events when the simulator holds the server's ground-truth token: header ``X-Attack``
  (``clean``, a preset name, or ``probe`` for the probing client) and ``X-Truth`` (the
  true labels). Each client identifies with its API key when given one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from workers.inference.data import demo_split
from workers.progress import progress_bar

CLEAN = "clean"
PROBE = "probe"


# --- phases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One phase: ``attack`` is None for clean traffic; ``target`` limits the attack to one model."""

    name: str
    seconds: float
    attack: str | None = None
    target: str | None = None


def parse_phases(spec: str, known_attacks: Iterable[str] | None = None) -> list[Phase]:
    """Parse "clean:60,pgd:30,pgd@cnn:10" into phases; raise ValueError naming the bad phase in one line."""
    if known_attacks is None:
        from workers.attacks import PRESETS

        known_attacks = PRESETS
    known = list(known_attacks)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("phases: expected 'name:seconds[,name:seconds...]', e.g. 'clean:60,pgd:30'")
    phases = []
    for raw in spec.split(","):
        item = raw.strip()
        name, sep, seconds_text = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"phase {item!r}: expected name:seconds, e.g. 'pgd:30'")
        try:
            seconds = float(seconds_text)
        except ValueError:
            raise ValueError(f"phase {item!r}: duration must be a number of seconds") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"phase {item!r}: duration must be a positive number of seconds")
        attack, _, target = name.partition("@")
        if attack == CLEAN:
            if target:
                raise ValueError(f"phase {item!r}: a clean phase has no target model")
            phases.append(Phase(name, seconds))
            continue
        if attack not in known:
            raise ValueError(f"phase {item!r}: unknown attack {attack!r}; known: clean, {', '.join(known)}")
        phases.append(Phase(name, seconds, attack=attack, target=target or None))
    return phases


# --- reference ----------------------------------------------------------------------------------


def publish_reference(
    bootstrap: str,
    state_dir: str | os.PathLike = "./.layerwatch",
    models: Iterable[str] | None = None,
    topic: str = "lw.predictions",
    *,
    seed: int = 0,
    extra_layers: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    batch_size: int = 256,
    include_inputs: bool = True,
    progress: bool = False,
    **client_config: Any,
) -> dict[str, int]:
    """Publish the validation split's outputs + layers for each demo model as role=reference batches.

    Returns {model name: events published}. ``extra_layers`` adds layers beside the
    penultimate one (give the same as the server's so reference and live layers match).
    """
    import torch

    from workers.inference.models import load_demo_models
    from workers.inference.publisher import Publisher
    from workers.inference.tap import LayerTap

    demo = load_demo_models(state_dir, models, progress=progress, seed=seed)
    split = demo_split(seed)
    counts: dict[str, int] = {}
    for name, model in demo.items():
        extra = extra_layers.get(name, ()) if isinstance(extra_layers, Mapping) else (extra_layers or ())
        tap = LayerTap(model.module, list(extra)) if extra else model.tap
        with Publisher(bootstrap, name, model_version=model.version, topic=topic, role="reference",
                       **client_config) as publisher:
            for start in range(0, len(split.y_val), batch_size):
                x = split.x_val[start : start + batch_size]
                y = split.y_val[start : start + batch_size]
                result = tap.tap(x, output_fn=lambda logits: torch.softmax(logits, dim=1))
                publisher.publish(result.outputs, result.layers, client_ids=["reference"] * len(y), truth=y,
                                  inputs=x.reshape(len(y), -1) if include_inputs else None)
            publisher.flush()
            counts[name] = publisher.sent_events
        if tap is not model.tap:
            tap.remove()
    return counts


# --- simulation ---------------------------------------------------------------------------------


@dataclass
class SimulationReport:
    """What the simulation sent: per phase and overall (events, not requests)."""

    phases: list[dict[str, Any]]
    sent: int
    accepted: int
    rejected: dict[int, int]
    errors: int
    seconds: float
    rate_asked: float
    rate_achieved: float
    requests: int
    via: str
    by_model: dict[str, int] = field(default_factory=dict)
    by_client: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Request:
    at: float  # seconds after the start
    phase: int
    model: str
    client: str
    x: np.ndarray  # (k, 1, 8, 8) float32
    truth: np.ndarray  # (k,)
    attack: str  # ground truth label: clean, a preset, or probe


def _plan(
    phases: list[Phase],
    rate: float,
    models: list[str],
    clients: int,
    probing_client: bool,
    probing_share: float,
    batch_size: int,
    attack_sets: Mapping[tuple[str, str], np.ndarray],
    seed: int,
    model_seed: int = 0,
) -> list[_Request]:
    """Every request of the run, decided up front (seeded): time, model, client, inputs, ground truth."""
    split = demo_split(model_seed)
    rng = np.random.default_rng(seed)
    x_test, y_test = split.x_test, split.y_test
    probe_index = int(rng.integers(len(y_test)))
    normal = [f"client-{i}" for i in range(clients)]
    plan: list[_Request] = []
    start = 0.0
    for p_index, phase in enumerate(phases):
        n_events = int(round(phase.seconds * rate))
        n_requests = math.ceil(n_events / batch_size)
        interval = phase.seconds / max(n_requests, 1)
        left = n_events
        for r in range(n_requests):
            k = min(batch_size, left)
            left -= k
            at = start + r * interval
            model = models[int(rng.integers(len(models)))]
            if probing_client and (not normal or rng.random() < probing_share):
                noise = rng.normal(0.0, 0.01, size=(k, *x_test.shape[1:])).astype(np.float32)
                x = np.clip(x_test[probe_index][None] + noise, 0.0, 1.0)
                plan.append(_Request(at, p_index, model, "prober-0", x, np.full(k, y_test[probe_index]), PROBE))
                continue
            client = normal[int(rng.integers(len(normal)))]
            idx = rng.integers(len(y_test), size=k)
            if phase.attack is not None and (phase.target is None or phase.target == model):
                x = attack_sets[(model, phase.attack)][idx]
                label = phase.attack
            else:
                x = x_test[idx]
                label = CLEAN
            plan.append(_Request(at, p_index, model, client, np.ascontiguousarray(x), y_test[idx], label))
        start += phase.seconds
    return plan


def _attack_sets(
    phases: list[Phase], models: list[str], state_dir: str | os.PathLike, seed: int, progress: bool
) -> dict[tuple[str, str], np.ndarray]:
    """Adversarial versions of the test split, per (model, attack) the phases need (cached on disk)."""
    needed = sorted({(m, p.attack) for p in phases if p.attack for m in models if p.target in (None, m)})
    if not needed:
        return {}
    from workers.attacks import generate
    from workers.inference.models import load_demo_models

    demo = load_demo_models(state_dir, sorted({m for m, _ in needed}), progress=progress, seed=seed)
    split = demo_split(seed)
    out = {}
    for model, attack in needed:
        result = generate(demo[model].module, split.x_test, split.y_test, attack, seed=seed, state_dir=state_dir,
                          model_name=model)
        out[(model, attack)] = result.x_adv
    return out


def simulate(
    url_or_bootstrap: str,
    phases: str = "clean:60,pgd:30,clean:30,fgsm:30",
    rate: float = 50.0,
    models: Sequence[str] | None = None,
    clients: int = 4,
    probing_client: bool = True,
    via: str = "http",
    progress: bool = True,
    seed: int = 0,
    *,
    state_dir: str | os.PathLike = "./.layerwatch",
    model_seed: int = 0,
    batch_size: int = 4,
    probing_share: float = 0.1,
    topic: str = "lw.predictions",
    concurrency: int = 16,
    client_config: Mapping[str, Any] | None = None,
    client_keys: Mapping[str, str] | None = None,
    ground_truth_token: str = "",
) -> SimulationReport:
    """Send phased clean/adversarial traffic at ``rate`` events/s; return what was sent per phase.

    ``via="http"``: ``url_or_bootstrap`` is the model server's base URL (``http://host:port``);
    ``via="publisher"``: it is a Kafka bootstrap address and the demo models run here,
    publishing through :class:`Publisher` (no server, no rate limit, no actions).
    ``seed`` drives the traffic (clients, models, inputs, noise); ``model_seed`` names the
    shared split, the demo models and the cached attack sets in ``state_dir``.
    Over HTTP, ``client_keys`` ({client id: API key}) gives each simulated client the key
    the server maps to its id (clients without one send ``X-Client-Id``, which only a
    server trusting the header honours), and ``ground_truth_token`` lets the requests
    carry the attack name and true labels (without it they carry none).
    """
    if via not in ("http", "publisher"):
        raise ValueError(f"via must be 'http' or 'publisher', got {via!r}")
    if not rate > 0:
        raise ValueError("rate must be a positive number of events per second")
    if clients < 0 or (clients == 0 and not probing_client):
        raise ValueError("need at least one client")
    parsed = parse_phases(phases)
    if models is None:
        models = _server_models(url_or_bootstrap) if via == "http" else None
        if models is None:
            from workers.inference.models import MODEL_NAMES

            models = list(MODEL_NAMES)
    models = list(models)
    for phase in parsed:
        if phase.target is not None and phase.target not in models:
            raise ValueError(f"phase {phase.name!r}: target model {phase.target!r} is not one of {', '.join(models)}")
    attack_sets = _attack_sets(parsed, models, state_dir, model_seed, progress)
    plan = _plan(parsed, rate, models, clients, probing_client, probing_share, batch_size, attack_sets, seed,
                 model_seed)
    if via == "http":
        outcome = asyncio.run(_run_http(url_or_bootstrap.rstrip("/"), plan, parsed, concurrency, progress,
                                        dict(client_keys or {}), ground_truth_token))
    else:
        outcome = _run_publisher(url_or_bootstrap, plan, parsed, models, state_dir, model_seed, topic, progress,
                                 dict(client_config or {}))
    return _report(parsed, plan, outcome, rate, via)


def _server_models(url: str) -> list[str] | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
            return list(json.loads(response.read())["models"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class _Outcome:
    started_ms: int
    t0: float
    sent_at: list[float]  # per request, seconds after t0 (actual)
    status: list[int]  # per request: HTTP status (0 = transport error), 200 for the publisher
    finished: float


class _Bar:
    """A progress bar over the events of the run (``workers.progress``: silent when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.progress = progress_bar(enabled)
        self.task = self.progress.add_task("simulating", total=total)

    def __enter__(self) -> "_Bar":
        self.progress.__enter__()
        return self

    def advance(self, n: int, description: str | None = None) -> None:
        self.progress.update(self.task, advance=n, description=description or "simulating")

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


async def _run_http(url: str, plan: list[_Request], phases: list[Phase], concurrency: int,
                    progress: bool, client_keys: Mapping[str, str], ground_truth_token: str) -> _Outcome:
    import aiohttp

    status = [0] * len(plan)
    sent_at = [0.0] * len(plan)
    limit = asyncio.Semaphore(concurrency)
    total = sum(len(r.truth) for r in plan)

    async def send(session: aiohttp.ClientSession, i: int, req: _Request) -> None:
        headers = {"Content-Type": "application/octet-stream", "X-Shape": ",".join(str(d) for d in req.x.shape)}
        if req.client in client_keys:  # the identity the server relies on
            headers["X-Api-Key"] = client_keys[req.client]
        else:  # honoured only by a server that trusts the header
            headers["X-Client-Id"] = req.client
        if ground_truth_token:
            headers.update({"X-Ground-Truth-Token": ground_truth_token, "X-Attack": req.attack,
                            "X-Truth": ",".join(str(int(t)) for t in req.truth)})
        try:
            async with session.post(f"{url}/predict", params={"model": req.model},
                                    data=req.x.astype("<f4").tobytes(), headers=headers) as response:
                await response.read()
                status[i] = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            status[i] = 0
        finally:
            limit.release()

    timeout = aiohttp.ClientTimeout(total=30)
    with _Bar(progress, total) as bar:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            tasks = []
            started_ms = int(time.time() * 1000)
            t0 = time.monotonic()
            for i, req in enumerate(plan):
                delay = t0 + req.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await limit.acquire()
                sent_at[i] = time.monotonic() - t0
                tasks.append(asyncio.create_task(send(session, i, req)))
                bar.advance(len(req.truth), f"{phases[req.phase].name}")
            end = t0 + sum(p.seconds for p in phases)
            if end > time.monotonic():  # keep the clock running to the end of the last phase
                await asyncio.sleep(end - time.monotonic())
            await asyncio.gather(*tasks)
            finished = time.monotonic() - t0
    return _Outcome(started_ms, t0, sent_at, status, finished)


def _run_publisher(bootstrap: str, plan: list[_Request], phases: list[Phase], models: list[str],
                   state_dir: str | os.PathLike, seed: int, topic: str, progress: bool,
                   client_config: dict[str, Any]) -> _Outcome:
    from workers.inference.models import load_demo_models
    from workers.inference.publisher import Publisher

    demo = load_demo_models(state_dir, models, progress=progress, seed=seed)
    publishers = {m: Publisher(bootstrap, m, model_version=demo[m].version, topic=topic, **client_config)
                  for m in models}
    status = [0] * len(plan)
    sent_at = [0.0] * len(plan)
    total = sum(len(r.truth) for r in plan)
    try:
        with _Bar(progress, total) as bar:
            started_ms = int(time.time() * 1000)
            t0 = time.monotonic()
            for i, req in enumerate(plan):
                delay = t0 + req.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing, not synchronisation
                sent_at[i] = time.monotonic() - t0
                probs, layers = demo[req.model].predict(req.x)
                publishers[req.model].publish(probs, layers, client_ids=[req.client] * len(req.truth),
                                              truth=req.truth, attack="" if req.attack == CLEAN else req.attack,
                                              inputs=req.x.reshape(len(req.truth), -1))
                status[i] = 200
                bar.advance(len(req.truth), phases[req.phase].name)
            end = t0 + sum(p.seconds for p in phases)
            if end > time.monotonic():
                time.sleep(end - time.monotonic())
            for publisher in publishers.values():
                publisher.flush()
            finished = time.monotonic() - t0
    finally:
        for publisher in publishers.values():
            try:
                publisher.close()
            except Exception:
                pass
    return _Outcome(started_ms, t0, sent_at, status, finished)


def _report(phases: list[Phase], plan: list[_Request], outcome: _Outcome, rate: float, via: str) -> SimulationReport:
    """Per-phase figures from the actual send times (monotonic clock), not from the plan."""
    rejected: dict[int, int] = {}
    by_model: dict[str, int] = {}
    by_client: dict[str, int] = {}
    for i, r in enumerate(plan):
        k = len(r.truth)
        if outcome.status[i] != 200:
            rejected[outcome.status[i]] = rejected.get(outcome.status[i], 0) + k
        by_model[r.model] = by_model.get(r.model, 0) + k
        by_client[r.client] = by_client.get(r.client, 0) + k
    nominal_end = sum(p.seconds for p in phases)
    # the run ends with the nominal clock, or later when the last request went out late
    end = max(nominal_end, max(outcome.sent_at, default=0.0))
    firsts = {}
    for i, r in enumerate(plan):
        firsts.setdefault(r.phase, outcome.sent_at[i])
    rows = []
    nominal_start = 0.0
    for index, phase in enumerate(phases):
        reqs = [(i, r) for i, r in enumerate(plan) if r.phase == index]
        sent = sum(len(r.truth) for _, r in reqs)
        start = firsts.get(index, nominal_start)
        stop = next((firsts[j] for j in range(index + 1, len(phases)) if j in firsts), end)
        rows.append({
            "name": phase.name,
            "attack": phase.attack or CLEAN,
            "target": phase.target,
            "seconds": phase.seconds,
            "start_ms": outcome.started_ms + int(start * 1000),
            "end_ms": outcome.started_ms + int(stop * 1000),
            "sent": sent,
            "accepted": sum(len(r.truth) for i, r in reqs if outcome.status[i] == 200),
            "adversarial": sum(len(r.truth) for _, r in reqs if r.attack not in (CLEAN, PROBE)),
            "rate": sent / (stop - start) if stop > start else 0.0,
        })
        nominal_start += phase.seconds
    sent = sum(len(r.truth) for r in plan)
    return SimulationReport(
        phases=rows,
        sent=sent,
        accepted=sent - sum(rejected.values()),
        rejected=rejected,
        errors=rejected.get(0, 0),
        seconds=round(outcome.finished, 3),
        rate_asked=rate,
        rate_achieved=sent / end if end > 0 else 0.0,
        requests=len(plan),
        via=via,
        by_model=by_model,
        by_client=by_client,
    )
