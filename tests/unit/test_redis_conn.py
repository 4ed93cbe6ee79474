"""Sentinel mode of tasks.redis_conn: settings checked with clear errors, and every Redis user
(broker, result backend, RedBeat, our own clients) given the Sentinels, the master's name and
both passwords. Pure: nothing connects (tests/sentinel runs the real failover)."""

from __future__ import annotations

import ssl

import pytest
from celery.backends.redis import SentinelBackend
from kombu import Connection
from kombu.transport import redis as kombu_redis
from redis.sentinel import SentinelConnectionPool

from tasks import redis_conn, transport
from tasks.celery_app import build_config, create_app
from tasks.settings import Settings, SettingsError, load_settings

SENTINEL_ENV = {
    "REDIS_SENTINELS": "sentinel-0:26379, sentinel-1:26380,[::1]:26381",
    "REDIS_SENTINEL_MASTER": "mymaster",
    "REDIS_PASSWORD": "p@ss/w:rd",  # characters a URL must quote
    "REDIS_SENTINEL_PASSWORD": "s-secret",
}


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("REDIS_URL", "RESULT_BACKEND_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SENTINEL_ENV.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_single_redis_stays_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SENTINELS", raising=False)
    settings = Settings(redis_url="redis://:pw@redis:6379/0")
    config = build_config(settings)
    assert config["broker_url"] == config["result_backend"] == "redis://:pw@redis:6379/0"
    assert "master_name" not in config["broker_transport_options"]
    assert config["redbeat_redis_url"] == "redis://:pw@redis:6379/0"
    assert redis_conn.client(settings).connection_pool.connection_kwargs["host"] == "redis"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_SENTINELS": "sentinel-0"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "sentinel-0:26379,sentinel-1:99999"}, "sentinel-1:99999"),
        ({"REDIS_SENTINELS": "sentinel-0:port"}, "is not host:port"),
        ({"REDIS_SENTINEL_MASTER": "my master"}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_PASSWORD": ""}, "REDIS_SENTINELS needs REDIS_PASSWORD"),
        ({"REDIS_SENTINEL_PASSWORD": ""}, "REDIS_SENTINEL_PASSWORD"),
        ({"REDIS_URL": "redis://:pw@redis:6379/0"}, "REDIS_SENTINELS replaces REDIS_URL"),
        ({"RESULT_BACKEND_URL": "redis://:pw@redis:6379/1"}, "RESULT_BACKEND_URL: unset"),
    ],
)
def test_bad_sentinel_settings_stop_with_a_clear_error(
    sentinel_env: Settings, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_broker_and_result_backend_go_through_the_sentinels(sentinel_env: Settings) -> None:
    config = build_config(sentinel_env)
    for url_key, options_key in (
        ("broker_url", "broker_transport_options"),
        ("result_backend", "result_backend_transport_options"),
    ):
        assert config[url_key].split(";") == [
            "sentinel://:p%40ss%2Fw%3Ard@sentinel-0:26379/0",
            "sentinel://:p%40ss%2Fw%3Ard@sentinel-1:26380/0",
            "sentinel://:p%40ss%2Fw%3Ard@[::1]:26381/0",
        ]
        options = config[options_key]
        assert options["master_name"] == "mymaster"
        assert options["sentinel_kwargs"]["password"] == "s-secret"
        assert options["visibility_timeout"] == sentinel_env.visibility_timeout
    # kombu reads the master's password back from the URL, unquoted.
    conn = Connection(config["broker_url"])
    assert conn.transport_cls == "sentinel"
    assert conn.password == "p@ss/w:rd"
    assert len(conn.alt) == 3


def test_the_app_uses_kombus_sentinel_transport_and_celerys_sentinel_backend(
    sentinel_env: Settings,
) -> None:
    app = create_app(sentinel_env)
    assert isinstance(app.backend, SentinelBackend)
    params = app.backend.connparams
    assert [(h["host"], h["port"]) for h in params["hosts"]] == redis_conn.sentinels(sentinel_env)
    assert params["password"] == "p@ss/w:rd"
    with app.connection_for_write() as conn:
        # kombu's Sentinel transport, with our rule that drops unreadable queue entries
        assert isinstance(conn.transport, kombu_redis.SentinelTransport)
        assert isinstance(conn.transport, transport.Transport)
        assert issubclass(conn.transport.Channel, kombu_redis.SentinelChannel)


@pytest.mark.parametrize(
    ("url", "reqs"),
    [
        ("redis://:pw@redis:6379/0", None),
        ("rediss://:pw@redis:6379/0", ssl.CERT_REQUIRED),
        ("rediss://:pw@redis:6379/0?ssl_cert_reqs=none", ssl.CERT_NONE),
    ],
)
def test_a_single_redis_uses_our_transport_and_tls_for_rediss(
    monkeypatch: pytest.MonkeyPatch, url: str, reqs: int | None
) -> None:
    monkeypatch.delenv("REDIS_SENTINELS", raising=False)
    app = create_app(Settings(redis_url=url, result_backend_url="redis://:pw@redis:6379/1"))
    with app.connection_for_write() as conn:
        assert type(conn.transport) is transport.Transport
        assert conn.ssl == ({"ssl_cert_reqs": reqs} if reqs is not None else False)


def test_redbeat_and_our_own_clients_follow_the_master(sentinel_env: Settings) -> None:
    config = build_config(sentinel_env)
    assert config["redbeat_redis_url"].startswith("redis-sentinel")
    options = config["redbeat_redis_options"]
    assert options["sentinels"] == [("sentinel-0", 26379), ("sentinel-1", 26380), ("::1", 26381)]
    assert options["service_name"] == "mymaster"
    assert options["password"] == "p@ss/w:rd"
    assert options["sentinel_kwargs"]["password"] == "s-secret"
    client = redis_conn.client(sentinel_env)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "p@ss/w:rd"
    sentinel_kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] == "s-secret"
