"""DSSE/Ed25519 envelopes: what the agent's verifier accepts and refuses."""

import base64
import json

import pytest

from agent import signing
from agent.signing import Keyring, VerificationError, sign_envelope, verify_envelope

TYPE = signing.RELEASE_PAYLOAD_TYPE


@pytest.fixture
def key():
    return signing.load_private_key_pem(signing.generate_private_key_pem())


@pytest.fixture
def keyring(key):
    return Keyring.from_pems(signing.public_key_pem(key.public_key()))


def test_it_round_trips(key, keyring):
    envelope = sign_envelope(b'{"a":1}', TYPE, key)
    assert verify_envelope(envelope, TYPE, keyring) == b'{"a":1}'


def test_it_uses_standard_pae():
    assert signing.pae("t", b"hello") == b"DSSEv1 1 t 5 hello"


def test_it_refuses_a_tampered_payload(key, keyring):
    envelope = sign_envelope(b'{"counter":1}', TYPE, key)
    envelope["payload"] = base64.b64encode(b'{"counter":9}').decode()
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, TYPE, keyring)
    assert err.value.code == "SIGNATURE_INVALID"


def test_it_refuses_a_truncated_payload(key, keyring):
    envelope = sign_envelope(b'{"counter":1,"model":"m"}', TYPE, key)
    raw = base64.b64decode(envelope["payload"])
    envelope["payload"] = base64.b64encode(raw[:-5]).decode()
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, TYPE, keyring)
    assert err.value.code == "SIGNATURE_INVALID"


def test_it_refuses_a_wrong_key(key):
    other = signing.load_private_key_pem(signing.generate_private_key_pem())
    envelope = sign_envelope(b"{}", TYPE, other)
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, TYPE, Keyring.from_pems(signing.public_key_pem(key.public_key())))
    assert err.value.code == "UNKNOWN_KEY"


def test_it_refuses_a_forged_keyid(key, keyring):
    other = signing.load_private_key_pem(signing.generate_private_key_pem())
    envelope = sign_envelope(b"{}", TYPE, other)
    envelope["signatures"][0]["keyid"] = signing.keyid_of(key.public_key())
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, TYPE, keyring)
    assert err.value.code == "SIGNATURE_INVALID"


def test_it_refuses_the_wrong_payload_type(key, keyring):
    envelope = sign_envelope(b"{}", signing.DIRECTIVE_PAYLOAD_TYPE, key)
    with pytest.raises(VerificationError) as err:
        verify_envelope(envelope, TYPE, keyring)
    assert err.value.code == "WRONG_PAYLOAD_TYPE"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda e: "not an object",
        lambda e: {**e, "payload": "%%%not-base64"},
        lambda e: {**e, "signatures": []},
        lambda e: {**e, "signatures": ["x"]},
    ],
)
def test_it_refuses_malformed_envelopes(key, keyring, mangle):
    envelope = json.loads(json.dumps(sign_envelope(b"{}", TYPE, key)))
    with pytest.raises(VerificationError) as err:
        verify_envelope(mangle(envelope), TYPE, keyring)
    assert err.value.code == "MALFORMED"
