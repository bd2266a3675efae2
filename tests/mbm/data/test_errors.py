import logging

from mbm.data.errors import SkipLog


def test_skip_log_counts_everything_and_rate_limits_warnings(caplog):
    now = [0.0]
    skips = SkipLog(interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mbm.data.errors"):
        for _ in range(5):
            skips.skip("npy.bad", "x")
        skips.skip("shard.corrupt", "y")  # a new reason warns at once
        now[0] = 11
        skips.skip("npy.bad", "z")
    assert skips.snapshot() == {"npy.bad": 6, "shard.corrupt": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "+4 more" in messages[1] and "more" not in messages[2]


def test_quiet_skip_log_counts_without_warning(caplog):
    skips = SkipLog(quiet=True)
    with caplog.at_level(logging.WARNING):
        skips.skip("npy.bad")
    assert skips.counts["npy.bad"] == 1 and not caplog.records
