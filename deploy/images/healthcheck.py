"""Container health check of the fedcare images (HEALTHCHECK, or a Kubernetes exec probe).

Runs with Debian's /usr/bin/python3 -I (standard library only, no fedcare import), so it stays cheap
and works even when the application's environment is broken:

    healthcheck.py tcp PORT            the coordinator: its network edge accepts TCP on 127.0.0.1:PORT
    healthcheck.py https URL           the inference service: GET URL answers 200 (GET /healthz needs no token)
    healthcheck.py process NAME        the hospital node: a live (not zombie) process with NAME in its argv

Exit status 0 healthy, 1 unhealthy (one line on stderr says why). The TLS check does not verify the
certificate: it probes the local process over loopback (the serving certificate names the hosts the
EHR gateway uses, which need not include 127.0.0.1), it does not authenticate a peer.
"""

import os
import socket
import ssl
import sys
import urllib.request

TIMEOUT = 4.0


def tcp(port: str, host: str = "127.0.0.1") -> str | None:
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT):
            return None
    except OSError as err:
        return f"tcp {host}:{port}: {err}"


def https(url: str) -> str | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            return None if response.status == 200 else f"GET {url}: {response.status}"
    except OSError as err:  # URLError, HTTPError (503 with the reason), timeouts
        return f"GET {url}: {err}"


def process(name: str) -> str | None:
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and any(name.encode() in arg for arg in argv):
            return None
    return f"no live process with {name!r} in its command line"


CHECKS = {"tcp": tcp, "https": https, "process": process}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    problem = CHECKS[argv[0]](*argv[1:])
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
