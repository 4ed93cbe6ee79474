"""A fake TwelveData `time_series` endpoint on loopback, scriptable per test.

Serves synthetic bars in TwelveData's JSON shape; `fail_first` answers the first N requests
with an HTTP error, `delay` slows every answer down.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakeTwelveData:
    def __init__(
        self,
        fail_first: int = 0,
        fail_status: int = 503,
        delay: float = 0.0,
        script: list[tuple[int, Any, dict[str, str]]] | None = None,
    ) -> None:
        self.script = list(script or [])  # (status, body, headers) answered first, in order
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.requests: list[tuple[float, dict[str, list[str]]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                fake.requests.append((time.monotonic(), query))
                time.sleep(fake.delay)
                if fake.script:
                    self._send(*fake.script.pop(0))
                    return
                if len(fake.requests) <= fake.fail_first:
                    self._send(fake.fail_status, {"status": "error", "message": "try later"})
                    return
                self._send(200, fake.payload(query))

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def payload(self, query: dict[str, list[str]]) -> dict[str, Any]:
        symbols = query["symbol"][0].split(",")
        start = dt.date.fromisoformat(query["start_date"][0][:10])
        end = dt.date.fromisoformat(query["end_date"][0][:10])
        series = {s: self.series(s, start, end) for s in symbols}
        return series[symbols[0]] if len(symbols) == 1 else series

    @staticmethod
    def series(symbol: str, start: dt.date, end: dt.date) -> dict[str, Any]:
        values = []
        day, price = start, 100.0
        while day <= end:
            if day.weekday() < 5:
                price *= 1.001
                close = f"{price:.4f}"
                values.append(
                    {
                        "datetime": day.isoformat(),
                        "open": close,
                        "high": f"{price * 1.01:.4f}",
                        "low": f"{price * 0.99:.4f}",
                        "close": close,
                        "volume": "1000",
                    }
                )
            day += dt.timedelta(days=1)
        return {"meta": {"symbol": symbol, "interval": "1day"}, "values": values, "status": "ok"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
