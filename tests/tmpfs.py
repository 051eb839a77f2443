"""Where the suite's throwaway files go: memory, when the machine has room for them."""

from __future__ import annotations

import os


def memory_dir() -> str | None:
    """/dev/shm when it is a memory file system with room to spare (not Docker's 64 MB default):
    files there cost no disk writes, and this machine's disk is mounted with `discard`, so every
    unlink is a TRIM. None: the system's temporary directory."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize >= 2 << 30 else None
