"""The process-memory helper: a reset peak follows a real allocation, on the kernel's own count."""
import sys

import pytest

from fedprune.memory_usage import current_rss_bytes, peak_rss_bytes, reset_peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_after_reset_is_the_step_own():
    assert reset_peak_rss()
    before = current_rss_bytes()
    assert 0 < before <= peak_rss_bytes() < before + 32 * 2**20  # the reset brought the peak down to now
    block = bytearray(96 * 2**20)  # zero-filled and touched: resident
    block[::4096] = b"\x01" * len(block[::4096])
    grown = current_rss_bytes()
    del block
    assert grown - before >= 90 * 2**20
    # after del: the peak still holds the block (the kernel syncs its counters lazily: 1 MiB slack)
    assert peak_rss_bytes() >= grown - 2**20 and peak_rss_bytes() - before >= 89 * 2**20
