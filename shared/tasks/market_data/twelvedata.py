"""The TwelveData ``time_series`` API over HTTP (httpx).

One request carries up to ``batch_size`` symbols and costs one credit per symbol; the credits
per minute and per UTC day are shared by every worker through a Redis limiter
(``ratelimit.py``). Before each request the provider spends its credits: a short wait
(<= ``max_wait``) is slept, a longer one raises ``RateLimited`` with the wait (the refresh task
waits for it, see background_tasks.py); a wait for the next day raises ``DailyQuotaExhausted``.

What comes back is validated field by field:
- a row without a parseable date or a positive finite close is dropped (``rows_dropped``);
  open/high/low/volume that are missing, unparseable or inconsistent become None;
- a symbol whose series has the wrong shape goes to ``invalid`` with the reason;
- a symbol TwelveData does not know (code 404, or 400 "symbol not found") goes to ``unknown``;
  neither is retried;
- HTTP 429 or code 429 -> ``RateLimited`` (Retry-After, else until the next calendar minute,
  TwelveData's unit), or ``DailyQuotaExhausted`` when the message says the day's credits are
  gone (until the next UTC midnight); HTTP 5xx, timeouts,
  connection errors, a non-JSON answer -> ``TransientProviderError``; HTTP 401/403 or code
  401 -> ``ProviderConfigError``.

TwelveData's ``end_date`` is exclusive for daily bars (asking up to 2020-05-06 ends on
05-05), so the request asks for ``end + 1 day`` and keeps rows within [start, end].

The API key travels in the ``Authorization: apikey <key>`` header, never in the URL (so it
never reaches an access log); it is still masked in every exception text and log line.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import redis

from tasks.market_data.base import (
    Bar,
    DailyQuotaExhausted,
    FetchResult,
    ProviderConfigError,
    ProviderError,
    RateLimited,
    TransientProviderError,
)
from tasks.market_data.ratelimit import LocalRateLimiter, RateLimiter

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://api.twelvedata.com"
DEFAULT_RETRY_AFTER = 60.0  # an HTTP 429 without Retry-After nor a TwelveData message
MAX_OUTPUT = 5000  # rows per request
MAX_WINDOW_DAYS = 6900  # calendar days per request: < 5000 business days
# Yahoo-style names of the seed universe that TwelveData spells differently.
DEFAULT_SYMBOL_MAP: Mapping[str, str] = {"^GSPC": "SPX"}

_APIKEY_RE = re.compile(r"(apikey=)[^&\s'\"]+", re.IGNORECASE)
_NOT_FOUND_RE = re.compile(r"not found|invalid symbol|symbol .*(?:incorrect|not valid)", re.I)
_NO_DATA_RE = re.compile(r"no data is available", re.I)
_DAY_RE = re.compile(r"for the day|daily limit|per day", re.I)  # vs "for the current minute"


def redact(text: str, secret: str | None = None) -> str:
    """``text`` with the API key (and any ``apikey=...`` query value) replaced by ***."""
    if secret:
        text = text.replace(secret, "***")
    return _APIKEY_RE.sub(r"\1***", text)


class _RedactApiKey(logging.Filter):
    """httpx logs every request URL at INFO: never let the key reach the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "apikey=" in message.lower():
            record.msg, record.args = redact(message), None
        return True


logging.getLogger("httpx").addFilter(_RedactApiKey())


class TwelveDataProvider:
    name = "twelvedata"

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_URL,
        limiter: RateLimiter | None = None,
        batch_size: int = 8,
        timeout: float = 30.0,
        max_wait: float = 5.0,
        symbol_map: Mapping[str, str] | None = None,
    ) -> None:
        if not api_key:
            raise ProviderConfigError("TWELVEDATA_API_KEY is not set")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._api_key = api_key
        self._limiter: RateLimiter = limiter if limiter is not None else LocalRateLimiter(8)
        # A batch must fit in one minute's credits, or it could never be granted.
        self.batch_size = min(batch_size, self._limiter.limit)
        self.timeout = timeout
        self.max_wait = max_wait
        self._to_provider = dict(DEFAULT_SYMBOL_MAP if symbol_map is None else symbol_map)
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={
                "Accept": "application/json",
                "User-Agent": "waardhaven-tasks",
                "Authorization": f"apikey {api_key}",
            },
        )
        self.credits_per_minute: int | None = self._limiter.limit

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TwelveDataProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- fetching -----------------------------------------------------------------------

    def fetch_daily(self, symbols: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        result = FetchResult()
        wanted: list[str] = []
        for symbol in dict.fromkeys(symbols):  # each symbol once, in order
            if isinstance(symbol, str) and symbol.strip() and "," not in symbol:
                wanted.append(symbol)
            else:
                result.unknown.append(symbol)
        if start > end:
            return result
        windows = []
        first = start
        while first <= end:
            last = min(end, first + dt.timedelta(days=MAX_WINDOW_DAYS - 1))
            windows.append((first, last))
            first = last + dt.timedelta(days=1)
        for i in range(0, len(wanted), self.batch_size):
            batch = wanted[i : i + self.batch_size]
            for first, last in windows:
                self._spend(len(batch))
                payload = self._get(batch, first, last)
                result.extend(self._parse(batch, payload, first, last))
        result.bars.sort(key=lambda b: (b.symbol, b.date))
        return result

    def _spend(self, credits: int) -> None:
        """Spend credits: sleep short waits, hand longer ones to the task (``RateLimited``)."""
        deadline = time.monotonic() + self.max_wait
        while True:
            try:
                wait = self._limiter.acquire(credits)
            except redis.RedisError as exc:
                raise TransientProviderError(
                    f"rate limiter unavailable: {type(exc).__name__}: {redact(str(exc))}"
                ) from None
            if wait <= 0:
                return
            if wait > self._limiter.period:  # only the day's cap waits longer than a period
                raise DailyQuotaExhausted(
                    f"TwelveData credits for the day used up ({self._limiter.per_day} per UTC "
                    "day, shared by all workers)",
                    retry_after=wait,
                )
            if time.monotonic() + wait > deadline:
                raise RateLimited(
                    f"TwelveData credits used up ({self._limiter.limit} per "
                    f"{self._limiter.period:g}s, shared by all workers)",
                    retry_after=math.ceil(wait * 10) / 10,
                )
            time.sleep(wait)

    def _get(self, batch: list[str], start: dt.date, end: dt.date) -> Any:
        params: dict[str, str | int] = {
            "symbol": ",".join(self._to_provider.get(s, s) for s in batch),
            "interval": "1day",
            "start_date": start.isoformat(),
            "end_date": (end + dt.timedelta(days=1)).isoformat(),  # exclusive upstream
            "outputsize": MAX_OUTPUT,
            "order": "ASC",
            "format": "JSON",
        }
        try:
            response = self._client.get("/time_series", params=params)
        except httpx.TimeoutException as exc:
            raise TransientProviderError(
                f"TwelveData timed out after {self.timeout:g}s ({type(exc).__name__})"
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise ProviderConfigError(f"bad TWELVEDATA_URL: {self._mask(str(exc))}") from None
        except httpx.HTTPError as exc:  # connect/read/protocol errors
            raise TransientProviderError(
                f"TwelveData unreachable: {type(exc).__name__}: {self._mask(str(exc))}"
            ) from None
        status = response.status_code
        if status == 429:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and _is_error(body):
                _raise_rate_limited(body, self._api_key, _retry_after(response, None))
            raise RateLimited("TwelveData answered HTTP 429", _retry_after(response))
        if status in (401, 403):
            raise ProviderConfigError(f"TwelveData refused the API key (HTTP {status})")
        if status >= 500:
            raise TransientProviderError(f"TwelveData answered HTTP {status}")
        try:
            payload = response.json()
        except ValueError:
            if 400 <= status < 500:  # an HTML 404 and the like: the URL is wrong
                raise ProviderConfigError(
                    f"TwelveData answered HTTP {status} without JSON: check TWELVEDATA_URL"
                ) from None
            raise TransientProviderError(f"TwelveData answered HTTP {status}, not JSON") from None
        if _is_error(payload) and len(batch) > 1:
            # A whole-request error: out of credits, bad key, a server fault. Per-symbol
            # meanings (not found, no data) apply to every symbol below.
            _raise_for_request_error(payload, self._api_key)
        return payload

    # --- validation ---------------------------------------------------------------------

    def _parse(self, batch: list[str], payload: Any, start: dt.date, end: dt.date) -> FetchResult:
        result = FetchResult()
        series_of = self._split(batch, payload)
        for symbol in batch:
            if symbol not in series_of:
                result.invalid[symbol] = f"no series for {symbol!r} in the payload"
                continue
            self._series(symbol, series_of[symbol], start, end, result)
        return result

    def _split(self, batch: list[str], payload: Any) -> dict[str, Any]:
        """symbol (ours) -> its part of the payload; symbols absent from it are left out."""
        sent = {self._to_provider.get(s, s).upper(): s for s in batch}
        if isinstance(payload, list):
            if len(batch) == 1 and all(isinstance(r, dict) and "datetime" in r for r in payload):
                return {batch[0]: {"status": "ok", "values": payload}}  # bare rows
            found: dict[str, Any] = {}
            for item in payload:
                name = _series_symbol(item)
                if name is not None and name.upper() in sent:
                    found.setdefault(sent[name.upper()], item)
            if not found and len(payload) == len(batch) == 1:
                found[batch[0]] = payload[0]
            return found
        if not isinstance(payload, dict):
            return {}
        if _is_error(payload):
            return dict.fromkeys(batch, payload)  # the error applies to each symbol
        if len(batch) == 1 and ({"values", "meta", "status"} & payload.keys()):
            return {batch[0]: payload}
        found = {}
        for key, value in payload.items():
            if isinstance(key, str) and key.upper() in sent:
                found.setdefault(sent[key.upper()], value)
        if not found and "values" in payload:  # one series answered for a batch
            name = _series_symbol(payload)
            if name is not None and name.upper() in sent:
                found[sent[name.upper()]] = payload
        return found

    def _series(
        self, symbol: str, series: Any, start: dt.date, end: dt.date, result: FetchResult
    ) -> None:
        if not isinstance(series, dict):
            result.invalid[symbol] = f"series is a {type(series).__name__}, not an object"
            return
        if _is_error(series):
            verdict = _symbol_error(series, self._api_key)
            if verdict == "unknown":
                result.unknown.append(symbol)
            elif verdict is not None:
                result.invalid[symbol] = verdict
            return
        if series.get("status", "ok") != "ok":
            status = str(series.get("status"))[:50]
            result.invalid[symbol] = self._mask(f"unexpected status {status!r}")
            return
        if "values" not in series:
            result.invalid[symbol] = "'values' is missing"
            return
        values = series["values"]
        if not isinstance(values, list):
            result.invalid[symbol] = f"'values' is not a list (got {type(values).__name__})"
            return
        seen: set[dt.date] = set()
        kept: list[Bar] = []
        problems: dict[str, int] = {}
        for row in values:
            bar = _bar(symbol, row)
            if isinstance(bar, str):
                problems[bar] = problems.get(bar, 0) + 1
            elif not start <= bar.date <= end:
                continue  # outside what was asked: not an error
            elif bar.date in seen:
                problems["duplicate date"] = problems.get("duplicate date", 0) + 1
            else:
                seen.add(bar.date)
                kept.append(bar)
        dropped = sum(problems.values())
        result.rows_dropped += dropped
        summary = ", ".join(f"{n} x {why}" for why, n in sorted(problems.items()))
        if dropped and not kept and dropped == len(values):
            result.invalid[symbol] = f"none of its {dropped} rows is valid: {summary}"
            return
        if dropped:
            logger.warning("%s: dropped %d of %d rows (%s)", symbol, dropped, len(values), summary)
        result.bars.extend(kept)

    def _mask(self, text: str) -> str:
        return redact(text, self._api_key)


# --- helpers ------------------------------------------------------------------------------


def _is_error(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("status") == "error"


def _series_symbol(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    meta = item.get("meta")
    name = meta.get("symbol") if isinstance(meta, dict) else item.get("symbol")
    return name if isinstance(name, str) else None


def _code(payload: dict[str, Any]) -> int | None:
    try:
        return int(payload.get("code"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _message(payload: dict[str, Any], secret: str) -> str:
    return redact(str(payload.get("message") or ""), secret)[:200]


def _raise_rate_limited(payload: dict[str, Any], secret: str, retry_after: float | None) -> None:
    """TwelveData's "run out of API credits": for the current minute, or for the day."""
    message = _message(payload, secret)
    now = dt.datetime.now(dt.UTC)
    if _DAY_RE.search(message):
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        raise DailyQuotaExhausted(
            f"TwelveData credits for the day used up: {message}",
            retry_after if retry_after is not None else (midnight - now).total_seconds(),
        )
    if retry_after is None:  # credits come back with the next calendar minute (+1 s of skew)
        retry_after = 61.0 - now.second - now.microsecond / 1e6
    raise RateLimited(f"TwelveData answered code 429: {message}", retry_after)


def _raise_for_request_error(payload: dict[str, Any], secret: str) -> None:
    code, message = _code(payload), _message(payload, secret)
    if code == 429:
        _raise_rate_limited(payload, secret, None)
    if code in (401, 403):
        raise ProviderConfigError(f"TwelveData refused the request (code {code})")
    if code is None or code >= 500:
        raise TransientProviderError(f"TwelveData error {code}: {message}")


def _symbol_error(payload: dict[str, Any], secret: str) -> str | None:
    """A per-symbol error: raise, or 'unknown', or an invalid reason, or None (no data)."""
    code, message = _code(payload), _message(payload, secret)
    if code == 429:
        _raise_rate_limited(payload, secret, None)
    if code == 401:
        raise ProviderConfigError("TwelveData refused the API key (code 401)")
    if code is not None and code >= 500:
        raise TransientProviderError(f"TwelveData error {code}: {message}")
    if _NO_DATA_RE.search(message):
        return None  # a window without trading days (a holiday week-end): nothing to add
    if code == 404 or (code == 400 and _NOT_FOUND_RE.search(message)):
        return "unknown"
    return f"TwelveData error {code}: {message or 'no message'}"


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _positive(row: dict[str, Any], key: str) -> float | None:
    number = _number(row, key)
    return number if number is not None and number > 0 else None


def _bar(symbol: str, row: Any) -> Bar | str:
    """The row as a Bar, or why it was dropped."""
    if not isinstance(row, dict):
        return "row is not an object"
    when = row.get("datetime")
    if not isinstance(when, str):
        return "datetime missing"
    try:
        day = dt.date.fromisoformat(when.strip()[:10])
    except ValueError:
        return "datetime unparseable"
    close = _positive(row, "close")
    if close is None:
        return "close missing or not a positive number"
    open_, high, low = _positive(row, "open"), _positive(row, "high"), _positive(row, "low")
    known = [p for p in (open_, close) if p is not None]
    if (high is not None and (high < max(known) or (low is not None and high < low))) or (
        low is not None and low > min(known)
    ):
        open_, high, low = None, None, None  # inconsistent extras: keep only the close
    volume = _number(row, "volume")
    return Bar(
        symbol=symbol,
        date=day,
        close=close,
        open=open_,
        high=high,
        low=low,
        volume=int(volume) if volume is not None and volume >= 0 else None,
    )


def _retry_after(response: httpx.Response, default: Any = DEFAULT_RETRY_AFTER) -> Any:
    """Retry-After as seconds (a number or an HTTP date); ``default`` when absent or bad."""
    value = response.headers.get("Retry-After")
    if value is None:
        return default
    try:
        return max(1.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(1.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def limiter_key(api_key: str) -> str:
    """Redis key of the credits of one API key (credits belong to the key, not the app)."""
    return "waardhaven:ratelimit:twelvedata:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


__all__ = ["DEFAULT_SYMBOL_MAP", "ProviderError", "TwelveDataProvider", "limiter_key", "redact"]
