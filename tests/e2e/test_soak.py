"""The soak run of bench/soak.py, for 2 minutes instead of 10: the real server on the default model,
64 streaming clients of locust over 16 uploaded adapters, 10% of them disconnecting mid-stream, an
admin client uploading, replacing and deleting adapters throughout; the same goals as `make soak`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_two_minute_soak_meets_the_goals(tmp_path: Path) -> None:
    settings = soak.SoakSettings(minutes=2)
    result = soak.run(settings, tmp_path)
    # The load ran as planned: every kind of request and admin operation happened.
    requests = result["requests"]
    assert requests["completed"] > 0
    assert requests["disconnects"] > 0
    assert requests["uploads"] > 0 and requests["replaces"] > 0 and requests["deletes"] > 0
    assert result["gauges_peak"]["waiting"] > 0  # 64 clients, 32 sequences: the queue was used

    assert result["unexpected_errors"] == 0, result["error_messages"]
    assert result["health"]["failures"] == 0, result["health"]["messages"]
    assert result["rss"]["drift_pct"] < soak.MAX_DRIFT_PCT, result["rss_samples"]
    assert result["final_metrics"] == {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
    assert result["server_exit"] == 0
    assert soak.missed_goals(result) == []
