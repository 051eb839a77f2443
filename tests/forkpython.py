"""`python -u -c CODE`, forked from the fork server (tests/forkserver.py) instead of started.

xdist starts each worker as `PYTHON -u -c BOOTSTRAP` and talks to it over its stdin and stdout;
the controller (tests/conftest.py) names this script as that PYTHON. It hands its own stdin,
stdout and stderr and the rest of its command line to the fork server, whose child runs the code
with pytest, ccxt and the daemon already imported (a second of CPU less for each worker), and
ends with the child's exit code. Signals it gets are passed on to the child.

Run as `python -S tests/forkpython.py SOCKET -u -c CODE`: standard library only, no site.
"""

import json
import os
import signal
import socket
import sys


def main(path: str, args: list[str]) -> int:
    if args[:1] == ["-u"]:
        args = args[1:]
    if len(args) != 2 or args[0] != "-c":
        print(f"forkpython: only `-u -c CODE` is supported, not {args!r}", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    request = {"id": 0, "code": args[1], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
    pid = None
    while True:
        data = sock.recv(1 << 20)
        if not data:
            print("forkpython: the fork server is gone", file=sys.stderr)
            return 1
        message = json.loads(data)
        if "pid" in message:
            pid = message["pid"]
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda sig, _frame: os.kill(pid, sig))
        elif message.get("exited") == pid:
            return int(message["code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
