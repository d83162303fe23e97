"""The model server keys throttling, blocking and published client ids on an identity the client cannot forge."""

from __future__ import annotations

import time

import numpy as np
import pytest
from kafka import KafkaProducer

from schemas.codec import decode_batch, encode
from tests.waiting import wait_until
from tests.workers.inference.conftest import consume_all, post_json
from workers.inference.data import demo_split
from workers.inference.identity import IdentityPolicy, parse_client_keys
from workers.inference.server import ModelServer, ServerThread

pytestmark = [pytest.mark.reliability]

X = np.array(demo_split(0).x_test[:4]).reshape(4, 64).tolist()


def test_a_prober_rotating_x_client_id_is_one_client_and_is_throttled(demo_models) -> None:
    server = ModelServer({"cnn": demo_models["cnn"]}, rate=2.0, burst=10)  # default: the header is not trusted
    with ServerThread(server) as running:
        url = f"{running.url}/predict"
        codes = [post_json(url, X, {"X-Client-Id": f"prober-{i}"})[0] for i in range(4)]
    assert codes == [200, 200, 429, 429]  # one bucket of 10 tokens for every rotated id


@pytest.mark.integration
def test_identity_from_key_is_published_and_blocked_whatever_the_header(broker, topic, demo_models) -> None:
    keys = parse_client_keys("prober-key-0123 prober\nalice-key-4567 alice")
    server = ModelServer({"cnn": demo_models["cnn"]}, bootstrap=broker, predictions_topic=topic,
                         actions_topic=topic + ".actions", rate=None, identity=IdentityPolicy(keys=keys),
                         ground_truth_token="gt-token", flush_every=1)
    with ServerThread(server) as running:
        url = f"{running.url}/predict"

        def status(key: str, claimed: str) -> int:
            return post_json(url, X, {"X-Api-Key": key, "X-Client-Id": claimed})[0]

        assert [status("prober-key-0123", f"rotated-{i}") for i in range(3)] == [200, 200, 200]
        assert post_json(url, X, {"X-Api-Key": "guessed-key"})[0] == 401
        # ground truth only with the token
        assert post_json(url, X, {"X-Api-Key": "alice-key-4567", "X-Attack": "pgd"})[0] == 403
        assert post_json(url, X, {"X-Api-Key": "alice-key-4567", "X-Attack": "pgd",
                                  "X-Ground-Truth-Token": "gt-token"})[0] == 200
        producer = KafkaProducer(bootstrap_servers=broker)
        producer.send(topic + ".actions", encode("Action", {
            "client_id": "prober", "action": "block", "until_ms": int(time.time() * 1000) + 60_000,
            "reason": "probing", "model_id": ""})).get(timeout=10)
        producer.close()
        wait_until(lambda: status("prober-key-0123", "someone-else") == 403, timeout=15,
                   message="the block of the key's identity")
        assert status("alice-key-4567", "prober") == 200  # claiming the blocked id changes nothing either
        running.flush()
    records = consume_all(broker, topic, lambda rs: sum(decode_batch(r.value).n for r in rs) >= 6 * 4)
    batches = [decode_batch(r.value) for r in records]
    clients = [c for b in batches for c in b.client_ids]
    assert sorted(set(clients)) == ["alice", "prober"] and clients.count("alice") == 8  # no rotated id anywhere
    attacks = [a for b in batches if b.attack is not None for a, c in zip(b.attack, b.client_ids)]
    assert attacks == ["pgd"] * 4  # only the request with the token wrote ground truth
