"""This process's memory, read from /proc (no torch or Ray imported, so that a measured driver
holds only what its work needs)."""

from __future__ import annotations

import os


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory from its resident memory now, so that what a
    reused process (a Ray worker) held before does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """This process's peak resident memory, in MiB. Not getrusage's ru_maxrss: Linux carries that
    over from the parent through fork and exec, so a small child of a large parent reports the
    parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
