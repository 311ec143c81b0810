"""Pure role decisions of pgfailover.probe."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgfailover.probe import Role, report_from_row, role_from_parameters


def test_parameters_on_primary_say_primary_and_writable() -> None:
    """in_hot_standby=off and default_transaction_read_only=off: a writable primary."""
    params = {"in_hot_standby": "off", "default_transaction_read_only": "off"}
    report = role_from_parameters(params.get)
    assert report is not None
    assert (report.role, report.writable, report.source) == (Role.PRIMARY, True, "parameter_status")


def test_parameters_on_standby_say_standby() -> None:
    """in_hot_standby=on: a standby, never writable."""
    report = role_from_parameters({"in_hot_standby": "on"}.get)
    assert report is not None
    assert (report.role, report.writable) == (Role.STANDBY, False)


def test_read_only_primary_is_not_writable() -> None:
    """A primary whose sessions default to read-only is a primary that cannot take writes."""
    params = {"in_hot_standby": "off", "default_transaction_read_only": "on"}
    report = role_from_parameters(params.get)
    assert report is not None
    assert (report.role, report.writable) == (Role.PRIMARY, False)


def test_servers_before_14_give_no_parameter_answer() -> None:
    """Without in_hot_standby (PostgreSQL < 14) the parameters decide nothing: None."""
    assert role_from_parameters({"default_transaction_read_only": "off"}.get) is None


def test_row_with_matching_pid_is_direct() -> None:
    """The server's PID equal to the client's start-up PID means no pooler in between."""
    report = report_from_row((False, False, 4242, "127.0.0.1", 5432), client_pid=4242)
    assert (report.role, report.writable, report.via_pooler) == (Role.PRIMARY, True, False)
    assert report.server_address == "127.0.0.1:5432"


def test_row_with_other_pid_is_through_a_pooler() -> None:
    """A different PID means the client's backend key is a pooler's."""
    report = report_from_row((True, True, 4242, None, None), client_pid=91_000_001)
    assert (report.role, report.writable, report.via_pooler) == (Role.STANDBY, False, True)
    assert report.server_address is None


def test_row_without_client_pid_leaves_pooler_unknown() -> None:
    """No client PID to compare (0 or None): via_pooler stays None."""
    assert report_from_row((False, False, 1, "h", 1), client_pid=0).via_pooler is None
    assert report_from_row((False, False, 1, "h", 1), client_pid=None).via_pooler is None


@given(
    in_recovery=st.booleans(),
    read_only=st.booleans(),
    server_pid=st.integers(1, 2**31 - 1),
    client_pid=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
)
def test_row_decision_is_consistent(
    in_recovery: bool, read_only: bool, server_pid: int, client_pid: int | None
) -> None:
    """Writable exactly when neither in recovery nor read-only; standby exactly in recovery."""
    report = report_from_row((in_recovery, read_only, server_pid, "h", 1), client_pid)
    assert report.writable is (not in_recovery and not read_only)
    assert (report.role is Role.STANDBY) is in_recovery
    if client_pid:
        assert report.via_pooler is (client_pid != server_pid)
