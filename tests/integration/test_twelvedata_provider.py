"""TwelveDataProvider against a fake TwelveData ``time_series`` server on loopback.

The fake answers like the real API (a dict per symbol, keyed by symbol for a batch; an
exclusive ``end_date``) unless a test scripts its next answers: status, JSON (or raw bytes),
headers and a delay. Rate limiting uses the real Redis at REDIS_URL.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.market_data import (
    DailyQuotaExhausted,
    FetchResult,
    LocalRateLimiter,
    ProviderConfigError,
    ProviderError,
    RateLimited,
    RedisRateLimiter,
    TransientProviderError,
    TwelveDataProvider,
    get_provider,
)
from tasks.settings import Settings

D = dt.date
KEY = "sekrit-api-key-0123456789"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


# --- the fake server -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON-able, bytes (sent raw), or a callable(query) -> JSON-able
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    at: float
    path: str
    query: dict[str, str]
    authorization: str | None = None

    @property
    def symbols(self) -> list[str]:
        return self.query["symbol"].split(",")


def rows(start: dt.date, end: dt.date, base: float = 100.0) -> list[dict[str, str]]:
    """TwelveData-shaped rows of the business days in [start, end]."""
    out, day, price = [], start, base
    while day <= end:
        if day.weekday() < 5:
            price *= 1.001
            out.append(
                {
                    "datetime": day.isoformat(),
                    "open": f"{price * 0.998:.5f}",
                    "high": f"{price * 1.01:.5f}",
                    "low": f"{price * 0.99:.5f}",
                    "close": f"{price:.5f}",
                    "volume": "123456",
                }
            )
        day += dt.timedelta(days=1)
    return out


def series(symbol: str, values: Any) -> dict[str, Any]:
    meta = {"symbol": symbol, "interval": "1day", "currency": "USD", "type": "Common Stock"}
    return {"meta": meta, "values": values, "status": "ok"}


def real_answer(query: dict[str, str]) -> Any:
    """What TwelveData answers: end_date is exclusive for daily bars."""
    symbols = query["symbol"].split(",")
    start = D.fromisoformat(query["start_date"])
    end = D.fromisoformat(query["end_date"]) - dt.timedelta(days=1)
    by_symbol = {s: series(s, rows(start, end)) for s in symbols}
    return by_symbol[symbols[0]] if len(symbols) == 1 else by_symbol


class FakeTwelveData:
    def __init__(self) -> None:
        self.answers: list[Answer] = []  # answered first, in order; then `default`
        self.default: Callable[[dict[str, str]], Any] = real_answer
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                auth = self.headers.get("Authorization")
                fake.requests.append(Request(time.monotonic(), url.path, query, auth))
                answer = fake.answers.pop(0) if fake.answers else Answer(body=fake.default)
                time.sleep(answer.delay)
                body = answer.body(query) if callable(answer.body) else answer.body
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def answer(self, status: int = 200, body: Any = None, **kw: Any) -> FakeTwelveData:
        self.answers.append(Answer(status, body, **kw))
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeTwelveData]:
    server = FakeTwelveData()
    yield server
    server.close()


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def provider(fake: FakeTwelveData, **kw: Any) -> TwelveDataProvider:
    kw.setdefault("limiter", LocalRateLimiter(1000))
    kw.setdefault("timeout", 5.0)
    return TwelveDataProvider(api_key=KEY, base_url=fake.url, **kw)


def fetch(fake: FakeTwelveData, symbols: list[str], **kw: Any) -> FetchResult:
    with provider(fake, **kw) as p:
        return p.fetch_daily(symbols, D(2024, 1, 1), D(2024, 1, 5))


def assert_no_key(exc: BaseException) -> None:
    assert KEY not in str(exc) and KEY not in repr(exc)
    assert all(KEY not in str(arg) for arg in exc.args)


# --- normal answers ------------------------------------------------------------------------


def test_symbols_are_batched_by_eight_with_key_and_dates(fake: FakeTwelveData) -> None:
    symbols = [f"S{i}" for i in range(19)]
    with provider(fake) as p:
        assert p.batch_size == 8
        result = p.fetch_daily(symbols, D(2024, 1, 1), D(2024, 1, 5))
    assert [r.symbols for r in fake.requests] == [symbols[:8], symbols[8:16], symbols[16:]]
    for request in fake.requests:
        assert request.path == "/time_series"
        assert request.query == {
            "symbol": ",".join(request.symbols),
            "interval": "1day",
            "start_date": "2024-01-01",
            "end_date": "2024-01-06",  # TwelveData's end_date is exclusive
            "outputsize": "5000",
            "order": "ASC",
            "format": "JSON",
        }  # no key in the URL: access logs never see it
        assert request.authorization == f"apikey {KEY}"
    assert result.unknown == [] and result.invalid == {} and result.rows_dropped == 0
    assert len(result.bars) == 19 * 5
    first = result.bars[0]
    assert (first.symbol, first.date, first.close, first.volume) == (
        "S0",
        D(2024, 1, 1),
        100.1,
        123456,
    )
    assert first.open == pytest.approx(100.1 * 0.998, abs=1e-4) and first.high and first.low


def test_a_single_symbol_answer_is_the_series_itself(fake: FakeTwelveData) -> None:
    fake.answer(body=series("AAPL", rows(D(2024, 1, 1), D(2024, 1, 5))))
    result = fetch(fake, ["AAPL"])
    assert [(b.symbol, b.date.day) for b in result.bars] == [("AAPL", d) for d in range(1, 6)]


def test_rows_outside_the_window_are_not_kept(fake: FakeTwelveData) -> None:
    fake.answer(body=series("AAPL", rows(D(2023, 12, 28), D(2024, 1, 10))))
    result = fetch(fake, ["AAPL"])
    assert [b.date for b in result.bars] == [D(2024, 1, d) for d in range(1, 6)]
    assert result.rows_dropped == 0 and result.invalid == {}


def test_a_list_of_series_is_accepted(fake: FakeTwelveData) -> None:
    fake.answer(body=[series(s, rows(D(2024, 1, 1), D(2024, 1, 2))) for s in ("B", "A")])
    result = fetch(fake, ["A", "B", "C"])
    assert sorted({b.symbol for b in result.bars}) == ["A", "B"]
    assert len(result.bars) == 4
    assert list(result.invalid) == ["C"] and "no series" in result.invalid["C"]


def test_a_bare_list_of_rows_is_accepted_for_one_symbol(fake: FakeTwelveData) -> None:
    fake.answer(body=rows(D(2024, 1, 1), D(2024, 1, 3)))
    result = fetch(fake, ["AAPL"])
    assert [b.date.day for b in result.bars] == [1, 2, 3] and result.invalid == {}


def test_symbols_are_mapped_to_twelvedata_names_and_back(fake: FakeTwelveData) -> None:
    result = fetch(fake, ["^GSPC", "SPY"])
    assert fake.requests[0].symbols == ["SPX", "SPY"]
    assert {b.symbol for b in result.bars} == {"^GSPC", "SPY"}


def test_duplicate_symbols_are_asked_once_and_duplicate_dates_dropped(
    fake: FakeTwelveData,
) -> None:
    day = rows(D(2024, 1, 2), D(2024, 1, 2))
    fake.answer(body=series("AAPL", day + day + rows(D(2024, 1, 3), D(2024, 1, 3))))
    result = fetch(fake, ["AAPL", "AAPL"])
    assert fake.requests[0].symbols == ["AAPL"]
    assert [b.date.day for b in result.bars] == [2, 3] and result.rows_dropped == 1


def test_a_long_history_is_split_into_requests_of_at_most_5000_rows(
    fake: FakeTwelveData,
) -> None:
    fake.default = lambda q: series(q["symbol"], [])
    with provider(fake) as p:
        result = p.fetch_daily(["AAPL"], D(1990, 1, 1), D(2024, 12, 31))
    windows = [(r.query["start_date"], r.query["end_date"]) for r in fake.requests]
    assert windows[0][0] == "1990-01-01" and windows[-1][1] == "2025-01-01"
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert end == start  # contiguous, no gap and no overlap (end is exclusive)
    assert len(windows) == 2 and result.bars == [] and result.invalid == {}


# --- validation ----------------------------------------------------------------------------


def test_malformed_rows_are_dropped_and_malformed_series_reported(fake: FakeTwelveData) -> None:
    good = [
        {"datetime": "2024-01-02", "close": "10.5", "open": "10", "high": "11", "low": "9"},
        {"datetime": "2024-01-03 00:00:00", "close": 11, "volume": "n/a"},
        {"datetime": "2024-01-04", "close": "12", "high": "11", "low": "13"},  # inconsistent
    ]
    bad_rows = [
        {"datetime": "2024-01-01", "close": "abc"},
        {"datetime": "2024-01-01", "close": "-1"},
        {"datetime": "2024-01-01", "close": "0"},
        {"datetime": "2024-01-01", "close": "NaN"},
        {"datetime": "2024-01-01"},
        {"datetime": "2024-01-01", "close": True},
        {"close": "12"},
        {"datetime": "yesterday", "close": "12"},
        {"datetime": 20240105, "close": "12"},
        "junk",
        None,
    ]
    payload = {
        "GOOD": series("GOOD", good + bad_rows),
        "NOLIST": series("NOLIST", "nope"),
        "NOVALUES": {"meta": {"symbol": "NOVALUES"}, "status": "ok"},
        "NOTADICT": [1, 2, 3],
        "ALLBAD": series("ALLBAD", bad_rows[:3]),
        "WEIRD": {"status": "pending", "values": []},
    }
    fake.answer(body=payload)
    result = fetch(fake, [*payload, "ABSENT"])
    assert [(b.symbol, b.date, b.close) for b in result.bars] == [
        ("GOOD", D(2024, 1, 2), 10.5), ("GOOD", D(2024, 1, 3), 11.0), ("GOOD", D(2024, 1, 4), 12.0),
    ]  # fmt: skip
    first, second, third = result.bars
    assert (first.open, first.high, first.low, first.volume) == (10.0, 11.0, 9.0, None)
    assert second.volume is None
    assert (third.open, third.high, third.low) == (None, None, None)  # only the close kept
    assert result.rows_dropped == len(bad_rows) + 3
    assert result.unknown == []
    assert set(result.invalid) == {"NOLIST", "NOVALUES", "NOTADICT", "ALLBAD", "WEIRD", "ABSENT"}
    assert "not a list" in result.invalid["NOLIST"]
    assert "'values' is missing" in result.invalid["NOVALUES"]
    assert "not an object" in result.invalid["NOTADICT"]
    assert "none of its 3 rows" in result.invalid["ALLBAD"]
    assert "close missing or not a positive number" in result.invalid["ALLBAD"]
    assert "pending" in result.invalid["WEIRD"]
    assert "no series" in result.invalid["ABSENT"]


@pytest.mark.parametrize("body", ["a string", 42, None, {"unrelated": "dict"}])
def test_a_payload_of_the_wrong_shape_makes_every_symbol_invalid(
    fake: FakeTwelveData, body: Any
) -> None:
    fake.answer(body=body)
    result = fetch(fake, ["A", "B"])
    assert result.bars == [] and set(result.invalid) == {"A", "B"}


def test_unknown_symbols_are_reported_and_no_data_is_not_a_failure(fake: FakeTwelveData) -> None:
    not_found = "**symbol** not found: NOPE. Please specify it correctly."
    no_data = "No data is available on the specified dates. Try setting different dates."
    fake.answer(
        body={
            "AAPL": series("AAPL", rows(D(2024, 1, 2), D(2024, 1, 2))),
            "NOPE": {"status": "error", "code": 400, "message": not_found},
            "GONE": {"status": "error", "code": 404, "message": "Not Found"},
            "QUIET": {"status": "error", "code": 400, "message": no_data},
            "ODD": {"status": "error", "code": 400, "message": "interval is wrong"},
            "PAID": {"status": "error", "code": 403, "message": "upgrade your plan"},
        }
    )
    result = fetch(fake, ["AAPL", "NOPE", "GONE", "QUIET", "ODD", "PAID"])
    assert [b.symbol for b in result.bars] == ["AAPL"]
    assert result.unknown == ["NOPE", "GONE"]
    assert result.invalid == {
        "ODD": "TwelveData error 400: interval is wrong",
        "PAID": "TwelveData error 403: upgrade your plan",
    }


def test_a_single_unknown_symbol_answered_at_top_level(fake: FakeTwelveData) -> None:
    fake.answer(body={"status": "error", "code": 404, "message": "symbol not found"})
    result = fetch(fake, ["NOPE"])
    assert result.unknown == ["NOPE"] and result.bars == [] and result.invalid == {}


# --- errors --------------------------------------------------------------------------------


def until_next_minute() -> float:
    now = dt.datetime.now(dt.UTC)
    return 61.0 - now.second - now.microsecond / 1e6


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"Retry-After": "17"}, 17.0), ({}, None), ({"Retry-After": "x"}, None)],
)
def test_http_429_is_rate_limited_with_retry_after(
    fake: FakeTwelveData, headers: dict[str, str], expected: float | None
) -> None:
    fake.answer(429, {"status": "error", "code": 429, "message": "slow down"}, headers=headers)
    with pytest.raises(RateLimited) as caught:
        fetch(fake, ["AAPL"])
    # without a usable Retry-After: until TwelveData's next calendar minute (+1 s of skew)
    wait = until_next_minute() if expected is None else expected
    assert caught.value.retry_after == pytest.approx(wait, abs=1.0)
    assert isinstance(caught.value, TransientProviderError)
    assert_no_key(caught.value)


def test_retry_after_as_an_http_date(fake: FakeTwelveData) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    fake.answer(429, {}, headers={"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")})
    with pytest.raises(RateLimited) as caught:
        fetch(fake, ["AAPL"])
    assert 25 <= caught.value.retry_after <= 31


@pytest.mark.parametrize("symbols", [["AAPL"], ["AAPL", "MSFT"]])
def test_code_429_in_the_body_is_rate_limited(fake: FakeTwelveData, symbols: list[str]) -> None:
    message = "You have run out of API credits for the current minute."
    fake.answer(body={"status": "error", "code": 429, "message": message})
    with pytest.raises(RateLimited) as caught:
        fetch(fake, symbols)
    assert caught.value.retry_after == pytest.approx(until_next_minute(), abs=1.0)
    assert "run out of API credits" in str(caught.value)


@pytest.mark.parametrize("status", [200, 429])
def test_the_days_credits_used_up_is_not_a_minute_wait(fake: FakeTwelveData, status: int) -> None:
    message = "You have run out of API credits for the day. 801 API credits were used"
    fake.answer(status, {"status": "error", "code": 429, "message": message})
    with pytest.raises(DailyQuotaExhausted) as caught:
        fetch(fake, ["AAPL", "MSFT"])
    assert not isinstance(caught.value, TransientProviderError)  # never retried
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert caught.value.retry_after == pytest.approx((midnight - now).total_seconds(), abs=2)
    assert "for the day" in str(caught.value) and "credits return in" in str(caught.value)


def test_code_429_for_one_symbol_of_a_batch_is_rate_limited(fake: FakeTwelveData) -> None:
    fake.answer(
        body={
            "AAPL": series("AAPL", []),
            "MSFT": {"status": "error", "code": 429, "message": "credits"},
        }
    )
    with pytest.raises(RateLimited):
        fetch(fake, ["AAPL", "MSFT"])


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(fake: FakeTwelveData, status: int) -> None:
    fake.answer(status, {"status": "error", "code": status, "message": "oops"})
    with pytest.raises(TransientProviderError, match=f"HTTP {status}") as caught:
        fetch(fake, ["AAPL"])
    assert not isinstance(caught.value, RateLimited)


def test_a_server_error_code_in_the_body_is_transient(fake: FakeTwelveData) -> None:
    fake.answer(body={"status": "error", "code": 500, "message": "internal"})
    with pytest.raises(TransientProviderError, match="500"):
        fetch(fake, ["AAPL", "MSFT"])


def test_an_answer_slower_than_the_timeout_is_transient(fake: FakeTwelveData) -> None:
    fake.answer(body=series("AAPL", []), delay=1.5)
    started = time.monotonic()
    with pytest.raises(TransientProviderError, match="timed out") as caught:
        fetch(fake, ["AAPL"], timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert_no_key(caught.value)


def test_an_unreachable_server_is_transient() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = TwelveDataProvider(KEY, f"http://127.0.0.1:{port}", LocalRateLimiter(10), timeout=2)
    with pytest.raises(TransientProviderError, match="unreachable") as caught:
        p.fetch_daily(["AAPL"], D(2024, 1, 1), D(2024, 1, 2))
    assert_no_key(caught.value)


def test_a_non_json_answer_is_transient_and_an_html_404_a_config_error(
    fake: FakeTwelveData,
) -> None:
    fake.answer(200, b"<html>maintenance</html>")
    with pytest.raises(TransientProviderError, match="not JSON"):
        fetch(fake, ["AAPL"])
    fake.answer(404, b"<html>no such page</html>")
    with pytest.raises(ProviderConfigError, match="TWELVEDATA_URL"):
        fetch(fake, ["AAPL"])


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_a_config_error(fake: FakeTwelveData, status: int) -> None:
    fake.answer(status, {"status": "error", "code": status, "message": f"bad apikey {KEY}"})
    with pytest.raises(ProviderConfigError) as caught:
        fetch(fake, ["AAPL"])
    assert not isinstance(caught.value, TransientProviderError)
    assert_no_key(caught.value)


@pytest.mark.parametrize("symbols", [["AAPL"], ["AAPL", "MSFT"]])
def test_code_401_in_the_body_is_a_config_error(fake: FakeTwelveData, symbols: list[str]) -> None:
    message = f"**apikey** parameter is incorrect: {KEY}"
    fake.answer(body={"status": "error", "code": 401, "message": message})
    with pytest.raises(ProviderConfigError) as caught:
        fetch(fake, symbols)
    assert_no_key(caught.value)


def test_the_key_never_appears_in_errors_or_logs(
    fake: FakeTwelveData, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    leaky = f"bad parameter, your key {KEY} and apikey={KEY}"
    fake.answer(
        body={"A": {"status": "error", "code": 400, "message": leaky}, "B": series("B", [])}
    )
    fake.answer(body={"status": "error", "code": 503, "message": leaky})
    fake.answer(body={"status": "error", "code": 429, "message": leaky})
    result = fetch(fake, ["A", "B"])
    assert KEY not in result.invalid["A"] and "your key *** and apikey=***" in result.invalid["A"]
    failures: list[ProviderError] = []
    for _ in range(2):
        with pytest.raises(ProviderError) as caught:
            fetch(fake, ["A", "B"])
        failures.append(caught.value)
    for exc in failures:
        assert_no_key(exc)
    assert "GET http" in caplog.text and "apikey" not in caplog.text  # httpx's request lines
    assert KEY not in caplog.text


# --- credits shared through Redis ----------------------------------------------------------


def test_shared_credits_make_the_provider_wait_for_short_waits(
    fake: FakeTwelveData, rds: redis.Redis
) -> None:
    limiter = RedisRateLimiter(rds, f"test:td:{uuid.uuid4().hex}", limit=2, period=0.6)
    result = fetch(fake, ["A", "B", "C", "D", "E"], limiter=limiter, max_wait=5.0)
    assert [r.symbols for r in fake.requests] == [["A", "B"], ["C", "D"], ["E"]]
    gaps = [b.at - a.at for a, b in itertools.pairwise(fake.requests)]
    assert all(gap >= 0.55 for gap in gaps)  # each batch waited for the window
    assert len(result.bars) == 5 * 5


def test_long_waits_raise_rate_limited_instead_of_blocking(
    fake: FakeTwelveData, rds: redis.Redis
) -> None:
    key = f"test:td:{uuid.uuid4().hex}"
    # two workers (two providers, two connections) sharing the same credits
    first = RedisRateLimiter(rds, key, limit=3, period=30.0)
    second = RedisRateLimiter(redis.Redis.from_url(REDIS_URL), key, limit=3, period=30.0)
    fetch(fake, ["A", "B"], limiter=first, max_wait=0.5)
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        fetch(fake, ["C", "D"], limiter=second, max_wait=0.5)
    assert time.monotonic() - started < 0.5  # it did not sleep 30 s
    assert 25 < caught.value.retry_after <= 30  # the task retries with this countdown
    assert len(fake.requests) == 1  # nothing was sent without credits
    assert "shared by all workers" in str(caught.value)
    fetch(fake, ["E"], limiter=second, max_wait=0.5)  # the one credit left is still usable
    assert len(fake.requests) == 2


def test_an_unreachable_redis_is_transient(fake: FakeTwelveData) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    limiter = RedisRateLimiter(dead, "test:td:dead", limit=8)
    with pytest.raises(TransientProviderError, match="rate limiter unavailable"):
        fetch(fake, ["A"], limiter=limiter)
    assert fake.requests == []


def test_get_provider_builds_a_working_twelvedata_provider(
    fake: FakeTwelveData, rds: redis.Redis
) -> None:
    settings = Settings(
        market_data_provider="twelvedata",
        twelvedata_api_key=f"{KEY}-{uuid.uuid4().hex[:6]}",
        twelvedata_url=fake.url,
        provider_credits_per_minute=4,
        provider_batch_size=8,
        provider_timeout=5,
    )
    p = get_provider(settings, rds)
    assert p.batch_size == 4  # a batch must fit in a minute's credits
    result = p.fetch_daily(["A", "B", "C", "D"], D(2024, 1, 1), D(2024, 1, 2))
    assert {b.symbol for b in result.bars} == {"A", "B", "C", "D"}
    assert [r.symbols for r in fake.requests] == [["A", "B", "C", "D"]]
    # the minute's credits are spent: any worker now gets a countdown, not a request
    again = get_provider(settings, redis.Redis.from_url(REDIS_URL))
    with pytest.raises(RateLimited) as caught:
        again.fetch_daily(["E"], D(2024, 1, 1), D(2024, 1, 2))
    assert 55 < caught.value.retry_after <= 60 and len(fake.requests) == 1
