"""`die_with_parent.py PROGRAM [ARGS...]`: exec PROGRAM so that it gets SIGTERM when its parent dies.

deploy/supervisord.conf starts every program of `make run` through this. supervisord stops its
programs when it is asked to (Ctrl-C, SIGTERM), but each runs in a process group of its own, so
when supervisord itself is killed (SIGKILL, an OOM kill, a test's cleanup) they would live on as
orphans, holding the web and MQTT ports that the next make run wants back. Linux's parent-death
signal (prctl PR_SET_PDEATHSIG) survives exec, so the program itself learns of it. Linux only;
elsewhere it just execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: die_with_parent.py PROGRAM [ARGS...]")
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            sys.exit(f"die_with_parent: prctl failed: {os.strerror(ctypes.get_errno())}")
        if os.getppid() != parent:  # the parent died before the signal was armed
            sys.exit(1)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
