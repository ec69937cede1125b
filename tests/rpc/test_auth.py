"""API keys in process: the keys file, and what a call's metadata authenticates to."""

from __future__ import annotations

import pytest

from kinema.errors import InvalidInput, PermissionDenied, Unauthenticated
from kinema.rpc.auth import ApiKeys, authenticated_tenant, key_hash, new_key


def test_keys_are_random_and_files_hold_only_their_hashes() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("kin_") and len(a) > 40
    keys = ApiKeys.parse(f"# tenants\nacme {key_hash(a)}\n\nbob:{key_hash(b).upper()}  # rotated 2026-11\n")
    assert len(keys) == 2 and keys.tenant_of(a) == "acme" and keys.tenant_of(b) == "bob"
    assert keys.tenant_of(key_hash(a)) is None  # the hash itself is no key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "acme\n",
        "acme notahash\n",
        "Acme " + "0" * 64,
        "acme " + "0" * 63,
        f"acme {'0' * 64}\nbob {'0' * 64}\n",
    ],
)
def test_bad_keys_files_are_refused_without_echoing_them(text) -> None:
    with pytest.raises(InvalidInput) as info:
        ApiKeys.parse(text, "keys.txt")
    assert "0" * 63 not in str(info.value)


def test_a_pasted_key_is_never_echoed_in_the_error() -> None:
    key = new_key()
    with pytest.raises(InvalidInput) as info:
        ApiKeys.parse(f"acme {key}\n", "keys.txt")
    assert key not in str(info.value) and "line 1" in str(info.value)


def test_metadata_authenticates_to_the_keys_tenant() -> None:
    key = new_key()
    keys = ApiKeys.parse(f"acme {key_hash(key)}")
    assert keys.authenticate([("authorization", f"Bearer {key}")]) == "acme" and authenticated_tenant() == "acme"
    assert keys.authenticate([("authorization", f"bearer  {key}"), ("kinema-tenant", "acme")]) == "acme"
    cases = [
        ([], Unauthenticated, "API_KEY_MISSING"),
        ([("authorization", key)], Unauthenticated, "API_KEY_MISSING"),  # no scheme
        ([("authorization", "Basic abc")], Unauthenticated, "API_KEY_MISSING"),
        ([("authorization", "Bearer kin_not-a-key")], Unauthenticated, "API_KEY_INVALID"),
        ([("authorization", f"Bearer {key}"), ("kinema-tenant", "bob")], PermissionDenied, "TENANT_MISMATCH"),
    ]
    for metadata, error, reason in cases:
        with pytest.raises(error) as info:
            keys.authenticate(metadata)
        assert info.value.reason == reason and key not in str(info.value)
