"""Signed task messages (TASK_SIGNING=true): Celery's `auth` serializer, nothing of our own.

Every process that sends tasks or control commands (the API, beat, the CLI, the workers
themselves for chords and `Task.replace`, Flower's revoke) signs with TASK_SIGNING_KEY, and
names its certificate (issuer + serial) in each message. Workers decode every task message
through the `auth` serializer, which verifies the signature against the certificates in
TASK_SIGNING_CERT_STORE: an unsigned message (plain JSON is no longer an accepted content
type) or one signed by a key whose certificate is not in the store fails to decode, and the
message guard (`tasks.base.GuardedConsumer`) logs, refuses and discards it; nothing refused
runs. Results and events stay JSON, so Flower and the exporter read them as before.

Rotation: put the new certificate into every store (both are trusted), roll the pods; switch
the key and certificate, roll; remove the old certificate, roll. See docs/api.md.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from celery.utils.log import get_logger
from kombu import pidbox

from tasks.settings import Settings, SettingsError

logger = get_logger(__name__)
AUTH_CONTENT_TYPE = "application/data"  # what Celery's `auth` serializer declares

KEY_BITS = 3072  # RSA (the only kind Celery's serializer takes); NIST: fine beyond 2030


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of signed messages, or {} when TASK_SIGNING is off."""
    if not settings.task_signing:
        return {}
    for name in ("task_signing_key", "task_signing_cert", "task_signing_cert_store"):
        path = getattr(settings, name)
        if not os.path.exists(path):
            raise SettingsError(
                f"waardhaven-tasks: bad configuration\n  {name.upper()}: {path} does not exist"
            )
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],  # tasks and control commands: signed or refused
        "security_key": settings.task_signing_key,
        "security_certificate": settings.task_signing_cert,
        "security_cert_store": settings.task_signing_cert_store,
        "security_digest": "sha256",
    }


def install(app: Any, settings: Settings) -> None:
    """Register the `auth` serializer with this process's key and trusted certificates."""
    if not settings.task_signing:
        return
    # JSON stays readable where no accept list is given (results, events): it is data there,
    # never a task to run.
    app.setup_security(allowed_serializers=["json"])
    # Control commands: signed ones as usual; unsigned ones only if they change nothing (the
    # exporter's `inspect stats/active_queues`, which it sends in plain JSON), answered in JSON.
    mailbox = app.control.mailbox
    mailbox.accept = ["auth", "json"]
    mailbox.node_cls = SignedControlNode


def _read_only(method: Any) -> bool:
    from celery.worker.control import Panel

    meta = Panel.meta.get(method) if isinstance(method, str) else None
    return meta is not None and meta.type == "inspect"


class SignedControlNode(pidbox.Node):
    """The worker's end of the control mailbox with signed messages on: `shutdown`, `revoke`,
    `pool_restart`... only when signed; an unsigned one is logged and ignored."""

    _reply_serializer: str | None = None

    def handle_message(self, body: Any, message: Any = None) -> Any:
        signed = message is None or message.content_type == AUTH_CONTENT_TYPE
        method = body.get("method") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not (signed or _read_only(method)):
            logger.error(
                "Refused unsigned control command %.100r: only inspect commands may be unsigned",
                method if method is not None else body,
            )
            return None
        self._reply_serializer = None if signed else "json"  # answered as asked
        return super().handle_message(body, message)

    def reply(self, data: Any, exchange: Any, routing_key: Any, ticket: Any, **kw: Any) -> None:
        mailbox: Any = self.mailbox
        mailbox._publish_reply(
            data,
            exchange,
            routing_key,
            ticket,
            channel=self.channel,
            serializer=self._reply_serializer or mailbox.serializer,
        )


def generate_keys(directory: Path, name: str = "waardhaven-tasks", days: int = 730) -> Path:
    """A new RSA key and self-signed certificate in `directory`: signing.key, signing.crt, and
    certs/signing.crt (the store). Returns the directory. Files are private (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())  # issuer + serial: the signer's id
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    store = directory / "certs"
    store.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    files = {
        directory / "signing.key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        directory / "signing.crt": pem,
        store / "signing.crt": pem,
    }
    for path, data in files.items():
        path.write_bytes(data)
        path.chmod(0o600)
    return directory


def env_for(directory: Path) -> dict[str, str]:
    """The environment variables that make a process sign with the keys in `directory`."""
    return {
        "TASK_SIGNING": "true",
        "TASK_SIGNING_KEY": str(directory / "signing.key"),
        "TASK_SIGNING_CERT": str(directory / "signing.crt"),
        "TASK_SIGNING_CERT_STORE": str(directory / "certs"),
    }
