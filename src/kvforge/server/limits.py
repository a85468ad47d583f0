"""What the server accepts, as one validated value: request size, queue length, messages per
request, who may call it (API key, Host names) and how long shutdown drains."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 * 2**20  # 413 beyond: a 128k-token prompt is about 0.5 MB of text
    max_queued: int = 256  # requests before the engine (bodies being read or prepared, or queued); 429 beyond
    max_messages: int = 1024  # messages of one chat request; 400 beyond
    api_key: str | None = None  # None: no key asked
    allowed_hosts: tuple[str, ...] | None = None  # Host header names answered; None: any
    shutdown_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queued", "max_messages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is outside the allowed range [1, inf); give a whole number >= 1")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout={self.shutdown_timeout!r} is outside the allowed range [0, inf) seconds")
        key = self.api_key
        if key is not None and (not key or not key.isascii() or not key.isprintable() or " " in key):
            raise ValueError("the API key is empty, or holds spaces, control or non-ASCII characters; choose a printable ASCII token")
        if self.allowed_hosts is not None and not all(self.allowed_hosts):
            raise ValueError(f"--allowed-hosts {','.join(self.allowed_hosts)!r} names an empty host")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(option: str | None, bind: str) -> tuple[str, ...] | None:
    """--allowed-hosts as names ('*': any). By default a server bound to loopback answers only to
    loopback names (a web page that rebinds its own name to 127.0.0.1 is refused); one bound
    elsewhere answers to any, since only its operator knows the names it is reached by."""
    if option is None:
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, bind.lower().strip("[]")))) if is_loopback(bind) else None
    names = tuple(n.strip().lower().strip("[]") for n in option.split(","))
    return None if "*" in names else names
