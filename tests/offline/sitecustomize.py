"""Put first on PYTHONPATH, this runs in every Python process of a command (kernels included)
and refuses, and records in $DAGMA_OFFLINE_LOG, any network use beyond this machine. It proves a
command works offline without root, where `unshare --net` cannot be used."""

import errno
import os
import socket
import sys

_LOG = os.environ.get("DAGMA_OFFLINE_LOG")
_HOST = socket.gethostname()


def _local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    name = str(host or "").strip("[]").lower()
    return (
        name in ("", "localhost", "::1", "0.0.0.0", "::", _HOST.lower())  # nosec B104
        or name.startswith("127.")
        or name.endswith(".localhost")
    )


def _refuse(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {sys.argv[:2]} {what}\n")
    raise OSError(errno.ENETUNREACH, f"offline test: refused {what}")


def _audit(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[-1]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else address
            if not _local(host):
                _refuse(f"{event} {address!r}")
    elif event.startswith(("socket.getaddrinfo", "socket.gethostby")) and not _local(args[0]):
        _refuse(f"{event} {args[0]!r}")


if _LOG:
    sys.addaudithook(_audit)
