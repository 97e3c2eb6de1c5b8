"""The log check every view gets (conftest.check_logs): what fails a test, and what log_allows lets through."""

from __future__ import annotations

from conftest import bad_log_lines

LOG = """\
2026-12-03 18:00:00 hsmfs.filler[7] INFO filled /a
2026-12-03 18:00:01 hsmfs.filler[7] CRITICAL ALARM: fanotify queue overflowed; some reads may have seen stub holes
2026-12-03 18:00:02 hsmfs.filler[7] ERROR bug while filling /b
Traceback (most recent call last):
  File "x.py", line 1, in <module>
"""


def test_alarms_bugs_and_tracebacks_fail_a_test() -> None:
    assert [line.split(" ", 4)[-1] for line in bad_log_lines(LOG, [])[:2]] == [
        "ALARM: fanotify queue overflowed; some reads may have seen stub holes", "bug while filling /b"]
    assert bad_log_lines(LOG, [])[2] == "Traceback (most recent call last):"


def test_log_allows_lets_expected_lines_through() -> None:
    assert bad_log_lines(LOG, ["queue overflowed", "bug while filling", "^Traceback"]) == []
    assert bad_log_lines("2026 hsmfs.filler[7] INFO all fine\n", []) == []
