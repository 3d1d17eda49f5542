"""The wire format's additions, compatible both ways: the directive's optional signed
`retry_denied` (an operator's explicit retry lifting a deny-list entry), and the presence's
per-model report (release running, last seq handled) and update in flight, which parse_presence
reads next to the old shape older agents still send."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from agent.protocol import (
    ProtocolError,
    build_directive_payload,
    encode_json,
    parse_directive,
    parse_presence,
    presence_payload,
    utcnow,
)

SHA = "ab" * 32


def _directive(**extra) -> bytes:
    now = utcnow()
    return build_directive_payload(
        device_id="box-1", seq=3, issued=now, expires=now + timedelta(hours=1), rollout_id="r-1", model="detector",
        release_envelope={"payload": "", "payloadType": "x", "signatures": []},
        artifact={"hardware": "hw", "sha256": SHA, "length": 10, "url": "http://h/a"}, **extra)


def test_it_leaves_retry_denied_out_unless_asked():
    plain = _directive()
    assert "retry_denied" not in json.loads(plain) and parse_directive(plain).retry_denied is False
    assert _directive(retry_denied=False) == plain
    retry = _directive(retry_denied=True)
    assert json.loads(retry)["retry_denied"] is True and parse_directive(retry).retry_denied is True


def test_it_takes_retry_denied_by_keyword_only():
    with pytest.raises(TypeError):
        build_directive_payload("box-1")  # type: ignore[misc]


def test_it_refuses_a_retry_denied_that_is_not_a_boolean():
    body = json.loads(_directive())
    body["retry_denied"] = "yes"
    with pytest.raises(ProtocolError, match="directive.retry_denied must be bool"):
        parse_directive(encode_json(body))


def test_it_keeps_the_old_presence_shape_byte_for_byte():
    old = encode_json({"_type": "presence", "online": True, "agent_version": "0.1.0", "active": {"detector": SHA}})
    assert presence_payload(online=True, agent_version="0.1.0", active={"detector": SHA}) == old
    assert parse_presence(old) == json.loads(old)  # an older agent's presence still reads
    assert parse_presence(b'{"online": false}') == {"online": False}


def test_it_reports_per_model_release_and_seq_and_the_update_in_flight():
    payload = presence_payload(
        online=True, agent_version="0.1.0", active={"detector": SHA},
        models={"detector": {"sha256": SHA, "version": "2.0", "committed": True, "seq": 7},
                "segmenter": {"sha256": None, "version": None, "committed": False, "seq": 9}},
        update={"model": "segmenter", "seq": 9, "phase": "downloading"})
    data = parse_presence(payload)
    assert data["models"]["detector"] == {"sha256": SHA, "version": "2.0", "committed": True, "seq": 7}
    assert data["models"]["segmenter"]["sha256"] is None
    assert data["update"] == {"model": "segmenter", "seq": 9, "phase": "downloading"}
    idle = parse_presence(presence_payload(online=True, agent_version="0.1.0", models={}))
    assert idle["models"] == {} and idle["update"] is None


@pytest.mark.parametrize("change,message", [
    ({"models": []}, "presence.models must be dict"),
    ({"models": {"detector": "x"}}, "must be an object"),
    ({"models": {"detector": {"sha256": "zz", "seq": 1}}}, "sha256 must be 64 lowercase hex"),
    ({"models": {"detector": {"sha256": SHA, "seq": -1}}}, "seq must be >= 0"),
    ({"models": {"detector": {"sha256": SHA, "version": 2}}}, "version must be str"),
    ({"update": {"model": "detector", "seq": 1}}, "presence.update.phase is missing"),
    ({"update": {"model": "detector", "seq": "1", "phase": "trial"}}, "presence.update.seq must be int"),
])
def test_it_refuses_malformed_new_fields(change, message):
    body = {"_type": "presence", "online": True, "agent_version": "1", "active": {}, **change}
    with pytest.raises(ProtocolError, match=message):
        parse_presence(encode_json(body))


def test_it_documents_every_error_code_in_the_agents_readme():
    from pathlib import Path

    from agent.protocol import ErrorCode

    readme = (Path(__file__).resolve().parents[1] / "agent" / "README.md").read_text()
    assert [code for code in vars(ErrorCode) if code.isupper() and code not in readme] == []
