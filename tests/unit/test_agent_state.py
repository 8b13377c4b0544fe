"""fleet.agent.state: an identity whose token could not go into a header
(a line break slipped into agent.json) is refused as damaged, without the
token in the message, instead of being quoted by the HTTP library's error
on every redial."""

from __future__ import annotations

import json

import pytest

from fleet.agent.state import Identity, State, StateDamaged, StateError


@pytest.mark.parametrize("token", ["agent_abc\r\nX-Evil: 1", "agent abc", "", "agent_\x1b[2J"])
def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(tmp_path, token):
    state = State(tmp_path)
    state.identity_path.write_text(
        json.dumps(
            {"server_url": "ws://f:8433", "host_id": 1, "host_name": "web", "agent_token": token}
        )
    )
    with pytest.raises(StateError) as refused:
        state.load_identity()
    assert "damaged" in str(refused.value)
    if token:
        assert token not in str(refused.value)


def test_a_good_identity_loads(tmp_path):
    state = State(tmp_path)
    state.save_identity(Identity("ws://f:8433", 1, "web", "agent_" + "x" * 43))
    assert state.load_identity().host_name == "web"


@pytest.mark.parametrize("text", ['{"server_url": "ws://f:84', "[1, 2]", '{"nothing": 1}'])
def test_a_damaged_state_file_is_told_apart_from_a_missing_one(tmp_path, text):
    state = State(tmp_path)
    with pytest.raises(StateError) as missing:
        state.load_identity()
    assert not isinstance(missing.value, StateDamaged)  # not enrolled: a usage error
    state.identity_path.write_text(text)
    with pytest.raises(StateDamaged):
        state.load_identity()
    if text != '{"nothing": 1}':  # any object is a schedule set
        state.schedules_path.write_text(text)
        with pytest.raises(StateDamaged):
            state.load_schedules()
