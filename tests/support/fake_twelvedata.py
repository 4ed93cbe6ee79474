"""A fake TwelveData `time_series` endpoint on loopback that enforces the real quota.

Like TwelveData: the API key comes in the `Authorization: apikey <key>` header (or the
`apikey` parameter); each symbol of a request costs one credit; credits are counted per
calendar minute and per UTC day (free tier: 8 and 800); a request over either limit is
refused whole, costs nothing, and is answered with TwelveData's error body
`{"code": 429, "status": "error", "message": "You have run out of API credits for the current
minute. ..."}` (or "... for the day"), with HTTP 200 (`over_quota="body"`, what TwelveData
does) or HTTP 429 (`over_quota="http"`).

Scriptable: `fail_first` answers the first N requests with an HTTP error (`fail_at`: those
request numbers), `delay` slows every answer down, `next_day()` starts a new day's credits.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

MINUTE_MESSAGE = (
    "You have run out of API credits for the current minute. {used} API credits were used, "
    "with the current limit being {limit}. Wait for the next minute or consider switching to "
    "a higher tier plan at https://twelvedata.com/pricing"
)
DAY_MESSAGE = (
    "You have run out of API credits for the day. {used} API credits were used, with the "
    "current limit being {limit}. Wait for the next day or consider switching to a higher "
    "tier plan at https://twelvedata.com/pricing"
)


class FakeTwelveData:
    def __init__(
        self,
        fail_first: int = 0,
        fail_at: set[int] | None = None,
        fail_status: int = 503,
        delay: float = 0.0,
        script: list[tuple[int, Any, dict[str, str]]] | None = None,
        api_key: str = "test-key",
        credits_per_minute: int = 8,
        credits_per_day: int = 800,
        over_quota: Literal["body", "http"] = "body",
    ) -> None:
        self.script = list(script or [])  # (status, body, headers) answered first, in order
        self.fail_first = fail_first
        self.fail_at = set(fail_at or ())  # request numbers (1-based) answered fail_status
        self.fail_status = fail_status
        self.delay = delay
        self.api_key = api_key
        self.credits_per_minute = credits_per_minute
        self.credits_per_day = credits_per_day
        self.over_quota = over_quota
        self.requests: list[tuple[float, dict[str, list[str]]]] = []
        self.refused: list[tuple[float, str]] = []  # (when, "minute" | "day")
        self.paths: list[str] = []  # request lines as an access log would keep them
        self.granted: list[tuple[float, list[str]]] = []  # (wall time, symbols) served
        self._lock = threading.Lock()
        self._minutes: dict[int, int] = {}
        self._days: dict[int, int] = {}
        self._day_offset = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                fake.paths.append(self.path)
                fake.requests.append((time.monotonic(), query))
                time.sleep(fake.delay)
                if fake.script:
                    self._send(*fake.script.pop(0))
                    return
                if len(fake.requests) <= fake.fail_first or len(fake.requests) in fake.fail_at:
                    self._send(fake.fail_status, {"status": "error", "message": "try later"})
                    return
                if not fake.authorized(self.headers.get("Authorization"), query):
                    message = "**apikey** parameter is incorrect or not specified."
                    self._send(401, {"code": 401, "status": "error", "message": message})
                    return
                symbols = query["symbol"][0].split(",")
                refusal = fake.spend(len(symbols))
                if refusal is not None:
                    status = 200 if fake.over_quota == "body" else 429
                    self._send(status, {"code": 429, "status": "error", "message": refusal})
                    return
                self._send(200, fake.payload(query))

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorized(self, header: str | None, query: dict[str, list[str]]) -> bool:
        if header is not None:
            scheme, _, key = header.partition(" ")
            return scheme.lower() == "apikey" and key == self.api_key
        return query.get("apikey", [None])[0] == self.api_key

    def spend(self, credits: int) -> str | None:
        """Spend credits for a request, or the refusal message (nothing spent)."""
        with self._lock:
            now = time.time()
            minute, day = int(now // 60), int(now // 86400) + self._day_offset
            used_minute, used_day = self._minutes.get(minute, 0), self._days.get(day, 0)
            if used_day + credits > self.credits_per_day:
                self.refused.append((now, "day"))
                return DAY_MESSAGE.format(used=used_day + credits, limit=self.credits_per_day)
            if used_minute + credits > self.credits_per_minute:
                self.refused.append((now, "minute"))
                return MINUTE_MESSAGE.format(
                    used=used_minute + credits, limit=self.credits_per_minute
                )
            self._minutes[minute] = used_minute + credits
            self._days[day] = used_day + credits
            return None

    def next_day(self) -> None:
        """The day's credits are back (as at midnight UTC)."""
        with self._lock:
            self._day_offset += 1

    def credits_by_minute(self) -> dict[int, int]:
        with self._lock:
            return dict(self._minutes)

    def payload(self, query: dict[str, list[str]]) -> dict[str, Any]:
        symbols = query["symbol"][0].split(",")
        with self._lock:
            self.granted.append((time.time(), symbols))
        start = dt.date.fromisoformat(query["start_date"][0][:10])
        end = dt.date.fromisoformat(query["end_date"][0][:10]) - dt.timedelta(days=1)  # exclusive
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
