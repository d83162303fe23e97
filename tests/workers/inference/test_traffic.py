"""Traffic: phase parsing, the simulation's phases and rates over HTTP and the publisher, the reference."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas.codec import decode_batch
from tests.workers.inference.conftest import consume_all
from workers.inference.models import DETECTOR_LAYERS
from workers.inference.server import ModelServer, ServerThread
from workers.inference.traffic import Phase, parse_phases, publish_reference, simulate


def test_parse_phases():
    assert parse_phases("clean:60,pgd:30,clean:1.5,fgsm@cnn:30") == [
        Phase("clean", 60.0), Phase("pgd", 30.0, attack="pgd"), Phase("clean", 1.5),
        Phase("fgsm@cnn", 30.0, attack="fgsm", target="cnn")]
    with pytest.raises(ValueError) as bad:
        parse_phases("clean:60,pgd:x")
    assert str(bad.value) == "phase 'pgd:x': duration must be a number of seconds"
    with pytest.raises(ValueError, match=r"phase 'bim:5': unknown attack 'bim'; known: clean, fgsm, fgm, pgd"):
        parse_phases("bim:5")
    for spec, message in [("clean", "expected name:seconds"), ("pgd:-3", "positive"), ("", "expected"),
                          ("clean@cnn:3", "no target")]:
        with pytest.raises(ValueError, match=message):
            parse_phases(spec)


def test_simulate_over_http_keeps_phases_and_rate(state_dir, demo_models):
    models = {k: demo_models[k] for k in ("cnn", "mlp")}
    with ServerThread(ModelServer(models, rate=None)) as running:
        report = simulate(running.url, "clean:1.5,fgsm:1.5", rate=120, clients=3, progress=False,
                          state_dir=state_dir, seed=1)
        served = running.server.stats()["predictions"]
    assert [p["name"] for p in report.phases] == ["clean", "fgsm"]
    assert [p["attack"] for p in report.phases] == ["clean", "fgsm"]
    for phase in report.phases:
        assert phase["sent"] == 180 and phase["accepted"] == 180
        assert abs(phase["rate"] - 120) <= 12, phase  # measured from the actual send times
        assert abs((phase["end_ms"] - phase["start_ms"]) - 1500) <= 150
    assert report.phases[0]["adversarial"] == 0 and report.phases[1]["adversarial"] > 100
    assert report.phases[1]["start_ms"] >= report.phases[0]["end_ms"] - 5
    assert abs(report.rate_achieved - 120) <= 12 and report.sent == 360 == served
    assert report.rejected == {} and set(report.by_model) == {"cnn", "mlp"}  # models asked from /health
    assert set(report.by_client) == {"client-0", "client-1", "client-2", "prober-0"}


@pytest.mark.integration
def test_simulate_via_publisher_carries_ground_truth(broker, topic, state_dir):
    report = simulate(broker, "clean:1,pgd_l2:1", rate=60, models=["mlp"], clients=2, probing_client=True,
                      via="publisher", progress=False, state_dir=state_dir, topic=topic, seed=2)
    assert report.sent == 120 and report.accepted == 120
    records = consume_all(broker, topic, lambda rs: sum(decode_batch(r.value).n for r in rs) >= 120)
    labels = Counter()
    for record in records:
        batch = decode_batch(record.value)
        assert batch.model_id == "mlp" and batch.truth is not None and batch.inputs.shape[1] == 64
        labels.update(batch.attack)
    probes = report.by_client.get("prober-0", 0)
    assert labels["probe"] == probes
    assert labels["pgd_l2"] == report.phases[1]["adversarial"] > 0
    assert labels[""] == 120 - probes - report.phases[1]["adversarial"]


@pytest.mark.integration
def test_publish_reference(broker, topic, state_dir):
    counts = publish_reference(broker, state_dir, models=["cnn", "resnet"], topic=topic)
    assert counts == {"cnn": 359, "resnet": 359}
    records = consume_all(broker, topic, lambda rs: sum(decode_batch(r.value).n for r in rs) >= 718)
    batches = [decode_batch(r.value) for r in records]
    assert {b.role for b in batches} == {"reference"}
    assert Counter(b.model_id for b in batches for _ in range(b.n)) == {"cnn": 359, "resnet": 359}
    assert all(list(b.layers) == ["penultimate", *DETECTOR_LAYERS[b.model_id]] and b.truth is not None for b in batches)
