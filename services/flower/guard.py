"""Start Flower with its basic auth on every path: `python guard.py <celery args>`.

Flower 2.2 checks FLOWER_BASIC_AUTH only in its page and API handlers: /metrics, /healthcheck,
/static/*, /login and the 404 page answer anyone. Behind an Ingress or HTTPRoute that exposes
the whole url_prefix, that is an open door whatever the controller. Here every handler class of
Flower's URL table (flower.urls.handlers, read when the app is built) gets a prepare() that
answers 401 unless the request carries one of the configured user:password pairs, so the
guarantee does not depend on the ingress controller. Probes and Prometheus authenticate too.
"""

from __future__ import annotations

import hmac
import sys
from base64 import b64decode
from typing import Any

from flower import urls
from tornado.web import RequestHandler, URLSpec

_guarded: dict[type, type] = {}


def authorized(header: str, allowed: list[str]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme != "Basic" or not token:
        return False
    try:
        given = b64decode(token.strip(), validate=True).decode()
    except ValueError:
        return False
    return any(hmac.compare_digest(given, pair) for pair in allowed)


def guard(handler: type[RequestHandler]) -> type[RequestHandler]:
    if handler not in _guarded:

        class Guarded(handler):  # type: ignore[misc, valid-type]
            def prepare(self) -> Any:
                # No basic_auth configured: nobody gets in (fail closed).
                allowed = self.application.options.basic_auth or []
                if not authorized(self.request.headers.get("Authorization", ""), allowed):
                    self.set_status(401)
                    self.set_header("WWW-Authenticate", 'Basic realm="flower"')
                    self.finish("Access denied")
                    return None
                return super().prepare()

        Guarded.__name__ = Guarded.__qualname__ = f"Guarded{handler.__name__}"
        _guarded[handler] = Guarded
    return _guarded[handler]


def install() -> None:
    """Wrap every handler of Flower's URL table in place (the app reads the list at start)."""
    for i, entry in enumerate(urls.handlers):
        if isinstance(entry, URLSpec):
            entry.handler_class = guard(entry.handler_class)
        elif isinstance(entry, tuple) and isinstance(entry[1], type):
            urls.handlers[i] = (entry[0], guard(entry[1]), *entry[2:])
        else:
            raise SystemExit(f"flower guard: unexpected entry in flower.urls.handlers: {entry!r}")


if __name__ == "__main__":
    install()
    from celery.__main__ import main

    sys.argv[0] = "celery"
    sys.exit(main())
