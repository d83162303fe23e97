"""workers/inference/identity.py: which client sent a request (pure, no server)."""

from __future__ import annotations

import hashlib

import pytest

from workers.inference.identity import (
    IdentityPolicy,
    UnknownKey,
    ground_truth_allowed,
    keys_by_client,
    parse_client_keys,
)

KEYS = """
# key              client
alice-secret-key   alice
sha256:{digest}    bob    # bob's key is stored hashed
""".format(digest=hashlib.sha256(b"bob-secret-key").hexdigest())


def test_key_file_maps_plain_and_hashed_keys_and_keeps_no_plain_key() -> None:
    table = parse_client_keys(KEYS)
    assert sorted(table.values()) == ["alice", "bob"]
    assert "alice-secret-key" not in table and all(len(k) == 64 for k in table)
    assert keys_by_client(KEYS) == {"alice": "alice-secret-key"}  # what a simulator can send


@pytest.mark.parametrize("text, message", [("only-a-key", "line 1"), ("k alice extra", "line 1"),
                                           ("\n\nsha256:abc alice", "line 3: sha256: needs 64 hex digits")])
def test_bad_key_lines_name_the_line_not_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_client_keys(text)
    assert "only-a-key" not in str(err.value) and "abc" not in str(err.value).replace("sha256:", "")


def test_a_key_decides_the_client_whatever_x_client_id_says() -> None:
    policy = IdentityPolicy(keys=parse_client_keys(KEYS), trust_header=True)
    assert policy.client_id({"X-Api-Key": "alice-secret-key", "X-Client-Id": "mallory"}, "10.0.0.1") == "alice"
    assert policy.client_id({"Authorization": "Bearer bob-secret-key"}, "10.0.0.1") == "bob"
    with pytest.raises(UnknownKey):
        policy.client_id({"X-Api-Key": "guessed"}, "10.0.0.1")


def test_x_client_id_counts_only_when_trusted() -> None:
    rotating = [{"X-Client-Id": f"prober-{i}"} for i in range(5)]
    untrusted = IdentityPolicy()
    assert {untrusted.client_id(h, "10.0.0.9") for h in rotating} == {"10.0.0.9"}
    trusted = IdentityPolicy(trust_header=True)
    assert {trusted.client_id(h, "10.0.0.9") for h in rotating} == {f"prober-{i}" for i in range(5)}
    assert trusted.client_id({"X-Client-Id": "x" * 500}, "10.0.0.9") == "10.0.0.9"  # invalid: the peer


def test_required_key() -> None:
    policy = IdentityPolicy(keys=parse_client_keys(KEYS), require_key=True)
    with pytest.raises(UnknownKey, match="required"):
        policy.client_id({"X-Client-Id": "alice"}, "10.0.0.1")


def test_ground_truth_needs_the_configured_token() -> None:
    assert ground_truth_allowed({"X-Ground-Truth-Token": "t0ken"}, "t0ken")
    assert not ground_truth_allowed({"X-Ground-Truth-Token": "wrong"}, "t0ken")
    assert not ground_truth_allowed({}, "t0ken")
    assert not ground_truth_allowed({"X-Ground-Truth-Token": ""}, "")  # no token configured: nobody
