"""Who may talk to the service: the Host it answers to and the bearer token it asks for.

* **Host.** A request whose ``Host`` header is not a name this service is bound to is refused (400): a web
  page on another site can point its own DNS name at 127.0.0.1 ("DNS rebinding") and then read this
  service's answers as same-origin; the Host header still carries that site's name. Bound to a loopback
  address, the service answers ``127.0.0.1``, ``localhost`` and ``::1``; bound to a name or address, that
  one; ``--allowed-host`` (repeatable) replaces the list (a proxy's public name). Bound to a wildcard address
  (``0.0.0.0``) without ``--allowed-host`` any Host passes: such a service must have a token, or
  ``--insecure-open``.
* **Token.** With ``--auth-token-file FILE`` every request but the page itself (``/``, ``/static/*``) and
  ``/healthz`` needs ``Authorization: Bearer <the file's content>`` (401 otherwise). A service bound beyond
  loopback must have one unless ``--insecure-open`` says it is meant to be open (:func:`access_for`).
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from pathlib import Path

from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
OPEN_PATHS = ("/", "/healthz")  # and /static/*: the page's own files hold no data


@dataclasses.dataclass(frozen=True)
class Access:
    """``allowed_hosts``: the Host names answered (None: any); ``token``: the bearer token (None: none)."""

    allowed_hosts: frozenset[str] | None = frozenset(LOOPBACK_NAMES)
    token: str | None = dataclasses.field(default=None, repr=False)

    def refusal(self, path: str, host: str, authorization: str) -> tuple[int, str] | None:
        """``(status, message)`` when a request for ``path`` with these headers is refused, else None."""
        name = host_name(host)
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return 400, (f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)}; "
                         "the service's --allowed-host)")
        if self.token is None or path in OPEN_PATHS or path.startswith("/static/"):
            return None
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return 401, "this service needs Authorization: Bearer <token> (the service's --auth-token-file)"
        return None


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port, lower case (``[::1]:8000`` → ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") > 1:  # a bare IPv6 address (an --allowed-host value), no port
        return header
    name, sep, port = header.rpartition(":")
    return name if sep and port.isdigit() else header


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"--auth-token-file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"--auth-token-file {str(path)!r} must hold one token of at least 16 characters "
                         "without spaces")
    return token


def access_for(host: str, allowed_hosts: tuple[str, ...] | list[str] = (), token_file: str | None = None,
               insecure_open: bool = False) -> Access:
    """The access rules of a service bound to ``host`` (module docstring); a service reachable from other
    machines without a token is refused unless ``insecure_open``."""
    token = read_token(token_file) if token_file else None
    if token is None and not insecure_open and not is_loopback(host):
        raise ValueError(f"--host {host} reaches beyond this machine: pass --auth-token-file FILE (clients "
                         "then send Authorization: Bearer TOKEN), or --insecure-open to serve anyone who "
                         "can reach it")
    if allowed_hosts:
        hosts: frozenset[str] | None = frozenset(host_name(h) for h in allowed_hosts)
    elif host in WILDCARDS:
        hosts = None
    elif is_loopback(host):
        hosts = frozenset(LOOPBACK_NAMES) | {host_name(host)}
    else:
        hosts = frozenset({host_name(host)})
    return Access(hosts, token)


class AccessGuard:
    """ASGI middleware: answers a refused request with a JSON 4xx before it reaches a route."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k: v for k, v in scope["headers"] if k in (b"host", b"authorization")}
            refused = self.access.refusal(scope["path"], headers.get(b"host", b"").decode("latin-1"),
                                          headers.get(b"authorization", b"").decode("latin-1"))
            if refused is not None:
                status, message = refused
                extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
                response = JSONResponse({"error": message, "status": status}, status_code=status,
                                        headers=extra)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
