"""Start Flower with its basic auth on every path: `python guard.py <celery args>`.

Flower 2.2 checks FLOWER_BASIC_AUTH only inside its page and API handlers: /metrics,
/healthcheck, /static/*, /login and the 404 page answer anyone. Behind an Ingress or HTTPRoute
that sends the whole url_prefix to Flower, that is an open door whatever the controller. Here
the application's router (Tornado's Application.find_handler, through which every request
passes) answers 401 before any handler runs unless the request carries one of the configured
user:password pairs, so the guarantee does not depend on the ingress controller. Probes
authenticate too. tests/chart/test_chart_processes.py requests every route of Flower's URL
table against a running Flower, with and without credentials.
"""

from __future__ import annotations

import hmac
import sys
from base64 import b64decode
from typing import Any

from flower.app import Flower
from tornado.web import RequestHandler


def authorized(header: str, allowed: list[str]) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme != "Basic" or not token:
        return False
    try:
        given = b64decode(token.strip(), validate=True).decode()
    except ValueError:
        return False
    return any(hmac.compare_digest(given, pair) for pair in allowed)


class Unauthorized(RequestHandler):
    def prepare(self) -> None:
        self.set_status(401)
        self.set_header("WWW-Authenticate", 'Basic realm="flower"')
        self.finish("Access denied")


def install() -> None:
    route = Flower.find_handler

    def find_handler(self: Flower, request: Any, **kwargs: Any) -> Any:
        # No basic_auth configured: nobody gets in (fail closed).
        allowed = self.options.basic_auth or []
        if not authorized(request.headers.get("Authorization", ""), allowed):
            return self.get_handler_delegate(request, Unauthorized)
        return route(self, request, **kwargs)

    Flower.find_handler = find_handler  # type: ignore[method-assign]


def use_kombus_transport() -> None:
    """Flower consumes no task queue, and its broker view (queue lengths) knows kombu's
    transports by URL scheme only: it gets kombu's own Redis transport, not the app's
    `tasks.transport` (which only matters to a consumer: it drops unreadable queue entries)."""
    from tasks.celery_app import app

    app.conf.broker_transport = None


if __name__ == "__main__":
    install()
    use_kombus_transport()
    from celery.__main__ import main

    sys.argv[0] = "celery"
    sys.exit(main())
