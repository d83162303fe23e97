"""The model server: concealment, terse errors, rate limits, actions from Kafka, published micro-batches."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from kafka import KafkaProducer

from schemas.codec import decode_batch, encode
from tests.waiting import wait_until
from tests.workers.inference.conftest import consume_all, http, post_json
from workers.inference.data import demo_split
from workers.inference.identity import IdentityPolicy
from workers.inference.server import ModelServer, ServerThread

SPLIT = demo_split(0)
X = np.array(SPLIT.x_test[:16])
Y = np.array(SPLIT.y_test[:16])


@pytest.fixture(scope="module")
def plain(demo_models):
    """A server without Kafka, generous limits."""
    with ServerThread(ModelServer(demo_models, rate=None, ground_truth_token="gt")) as running:
        yield running


def test_answers_top1_labels_only_by_default(plain, demo_models):
    status, _, body = post_json(f"{plain.url}/predict?model=cnn", X.reshape(16, 64).tolist())
    assert status == 200
    assert set(body) == {"labels", "event_ids"}  # target concealment: no scores, no top-k
    probs, _ = demo_models["cnn"].predict(X)
    assert body["labels"] == probs.argmax(1).tolist()
    assert len(set(body["event_ids"])) == 16
    # the binary form gives the same answer
    status, _, binary = http(f"{plain.url}/predict?model=cnn", X.astype("<f4").tobytes(),
                             {"Content-Type": "application/octet-stream", "X-Shape": "16,1,8,8"})
    assert status == 200 and binary["labels"] == body["labels"]
    # several models served: model= is required, and the answer names the choices
    status, _, answer = http(f"{plain.url}/predict", X.astype("<f4").tobytes(),
                             {"Content-Type": "application/octet-stream", "X-Shape": "16,1,8,8"})
    assert status == 400 and "model is required" in answer["error"] and "cnn, resnet, mlp" in answer["error"]
    status, _, nested = post_json(f"{plain.url}/predict?model=mlp", X.tolist())
    assert status == 200 and len(nested["labels"]) == 16


def test_top_k_and_scores_only_when_configured(demo_models):
    server = ModelServer({"mlp": demo_models["mlp"]}, rate=None, top_k=3, return_scores=True)
    with ServerThread(server) as running:
        status, _, body = post_json(f"{running.url}/predict", X[:4].reshape(4, 64).tolist())
    assert status == 200 and set(body) == {"labels", "event_ids", "top_k", "scores"}
    assert [row[0] for row in body["top_k"]] == body["labels"] and all(len(r) == 3 for r in body["top_k"])
    np.testing.assert_allclose(np.sum(body["scores"], axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "body, headers",
    [
        (b"{not json", {"Content-Type": "application/json"}),
        (b'{"inputs": "abc"}', {"Content-Type": "application/json"}),
        (b'{"inputs": [[1, 2, 3]]}', {"Content-Type": "application/json"}),
        (b'{"inputs": []}', {"Content-Type": "application/json"}),
        (b'[1, 2]', {"Content-Type": "application/json"}),
        (json.dumps({"inputs": [[float("nan")] * 64]}).encode(), {"Content-Type": "application/json"}),
        (b"\x00" * 256, {"Content-Type": "application/octet-stream", "X-Shape": "2,1,8,8"}),
        (b"\x00" * 256, {"Content-Type": "application/octet-stream", "X-Shape": "one,64"}),
        (b"\x00" * 256, {"Content-Type": "application/octet-stream"}),
        (json.dumps({"inputs": [[0.5] * 64] * 2}).encode(),
         {"Content-Type": "application/json", "X-Attack": "pgd", "X-Truth": "1,2,3", "X-Ground-Truth-Token": "gt"}),
    ],
)
def test_malformed_requests_get_a_400_saying_what_was_wrong(plain, body, headers):
    status, got_headers, answer = http(f"{plain.url}/predict?model=cnn", body, headers)
    assert status == 400
    assert set(answer) == {"error"} and answer["error"].startswith("bad request: ")
    assert re.search(r"body|field inputs|header X-", answer["error"]), answer  # names the culprit
    assert "expected" in answer["error"] and not re.search(r"Traceback|numpy|File \"", answer["error"]), answer


def test_other_errors_are_terse_too(plain):
    assert http(f"{plain.url}/predict?model=vgg", b"{}") [::2] == (
        404, {"error": "not found: model 'vgg' is not served: one of cnn, resnet, mlp"})
    assert http(f"{plain.url}/admin")[::2] == (404, {"error": "not found"})
    status, headers, body = http(f"{plain.url}/predict", method="GET")
    assert (status, body) == (405, {"error": "method not allowed"})
    big = b"[" + b"0," * 3_000_000 + b"0]"
    assert http(f"{plain.url}/predict?model=cnn", big, {"Content-Type": "application/json"})[::2] == (
        413, {"error": "payload too large"})
    status, _, health = http(f"{plain.url}/health")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["cnn", "resnet", "mlp"]


def test_per_client_token_bucket(demo_models):
    server = ModelServer({"cnn": demo_models["cnn"]}, rate=2.0, burst=10, identity=IdentityPolicy(trust_header=True))
    with ServerThread(server) as running:
        url = f"{running.url}/predict"
        codes = [post_json(url, X[:4].reshape(4, 64).tolist(), {"X-Client-Id": "greedy"})[0] for _ in range(3)]
        assert codes == [200, 200, 429]  # 10 tokens: 4 + 4, then 2 left for a request of 4
        status, headers, body = post_json(url, X[:4].reshape(4, 64).tolist(), {"X-Client-Id": "greedy"})
        assert (status, body) == (429, {"error": "too many requests"}) and int(headers["Retry-After"]) >= 1
        assert post_json(url, X[:4].reshape(4, 64).tolist(), {"X-Client-Id": "polite"})[0] == 200
        assert running.server.stats()["rejected_429"] == 2


def _produce_action(broker: str, topic: str, **action) -> None:
    producer = KafkaProducer(bootstrap_servers=broker)
    record = {"reason": "test", "model_id": "", **action}
    producer.send(topic, encode("Action", record)).get(timeout=10)
    producer.close()


@pytest.mark.integration
def test_block_and_throttle_actions_from_kafka(broker, topic, demo_models):
    server = ModelServer({"cnn": demo_models["cnn"]}, bootstrap=broker, actions_topic=topic,
                         predictions_topic=topic + ".predictions", rate=None, throttle_rate=0.5, throttle_burst=4,
                         identity=IdentityPolicy(trust_header=True))
    with ServerThread(server) as running:
        url = f"{running.url}/predict"

        def status_of(client: str) -> int:
            return post_json(url, X[:2].reshape(2, 64).tolist(), {"X-Client-Id": client})[0]

        assert status_of("mallory") == 200
        until_ms = int(time.time() * 1000) + 2500
        _produce_action(broker, topic, client_id="mallory", action="block", until_ms=until_ms)
        wait_until(lambda: status_of("mallory") == 403, timeout=15, message="the block action was not honoured")
        assert post_json(url, X[:2].reshape(2, 64).tolist(), {"X-Client-Id": "mallory"})[2] == {"error": "forbidden"}
        assert status_of("alice") == 200  # only the named client is blocked
        # blocked until the action expires, served again afterwards
        wait_until(lambda: status_of("mallory") == 200, timeout=15, message="the block never expired")
        assert int(time.time() * 1000) >= until_ms
        # throttle: a much smaller bucket; clear lifts it
        _produce_action(broker, topic, client_id="trudy", action="throttle", until_ms=int(time.time() * 1000) + 60_000)
        wait_until(lambda: status_of("trudy") == 429, timeout=15, message="the throttle action was not honoured")
        assert status_of("alice") == 200
        _produce_action(broker, topic, client_id="trudy", action="clear", until_ms=0)
        wait_until(lambda: status_of("trudy") == 200, timeout=15, message="the clear action was not honoured")
        # undecodable action records are skipped, not fatal
        producer = KafkaProducer(bootstrap_servers=broker)
        producer.send(topic, b"garbage").get(timeout=10)
        producer.close()
        wait_until(lambda: running.server.listener.invalid == 1, timeout=15)
        assert running.server.listener.is_alive() and status_of("alice") == 200


@pytest.mark.integration
def test_predictions_are_published_as_micro_batches(broker, topic, demo_models):
    server = ModelServer({"cnn": demo_models["cnn"], "mlp": demo_models["mlp"]}, bootstrap=broker,
                         predictions_topic=topic, actions_topic=topic + ".actions", rate=None,
                         extra_layers={"cnn": ["block2"]}, mc_dropout=4, preprocess="bitdepth:5",
                         flush_every=64, flush_interval_ms=60_000, identity=IdentityPolicy(trust_header=True),
                         ground_truth_token="gt")
    sent_ids = []
    with ServerThread(server) as running:
        for i in range(8):  # 8 requests x 16 = 128 predictions -> two records of 64 when flushed by size
            status, _, body = http(f"{running.url}/predict?model=cnn", X.astype("<f4").tobytes(),
                                   {"Content-Type": "application/octet-stream", "X-Shape": "16,64",
                                    "X-Client-Id": f"client-{i % 2}", "X-Attack": "pgd", "X-Ground-Truth-Token": "gt",
                                    "X-Truth": ",".join(map(str, Y))})
            assert status == 200
            sent_ids += body["event_ids"]
        status, _, body = post_json(f"{running.url}/predict?model=mlp", X[:3].reshape(3, 64).tolist())
        assert status == 200
        running.flush()  # the 3 mlp predictions are below flush_every and the interval is long
        assert running.server.stats()["delivered"] == 131
    records = consume_all(broker, topic, lambda rs: sum(decode_batch(r.value).n for r in rs) >= 131)
    batches = [decode_batch(r.value) for r in records]
    cnn = [b for b in batches if b.model_id == "cnn"]
    assert [b.n for b in cnn] == [64, 64]  # micro-batches, not single predictions
    assert [e for b in cnn for e in b.event_ids] == sent_ids
    for b in cnn:
        assert list(b.layers) == ["penultimate", "block2"]
        assert b.layers["penultimate"].shape == (64, 64) and b.layers["block2"].shape == (64, 32)
        assert set(b.client_ids) == {"client-0", "client-1"} and b.attack == ["pgd"] * 64
        np.testing.assert_array_equal(b.truth, np.tile(Y, 4))
        np.testing.assert_array_equal(b.inputs, np.tile(X.reshape(16, 64), (4, 1)))
        np.testing.assert_allclose(b.outputs.sum(axis=1), 1.0, rtol=1e-5)
        assert b.uncertainty is not None and (b.uncertainty >= 0).all()
        assert b.model_version == demo_models["cnn"].version
    (mlp,) = [b for b in batches if b.model_id == "mlp"]
    assert mlp.n == 3 and mlp.attack is None and mlp.truth is None and mlp.client_ids == ["127.0.0.1"] * 3
