"""Tokens and permissions without a server: the CLI's token, the file's checks, the patterns;
and the transport's envelope checks, case by case."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN
from tasks.api.tokens import TokenEntry, TokensFileError, TokenStore, parse_tokens, token_hash
from tasks.transport import envelope_problem


def test_the_cli_prints_a_token_once_and_the_entry_that_admits_it(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "waardhaven-tasks"), "api-token", "reporting",
         "--allow", "generate_report=submit", "--allow", "*=read"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    token, entry = out[0], json.loads(out[1])
    assert token.startswith("wht_") and len(token) > 40
    assert token not in out[1]  # the file gets the hash only
    assert entry["sha256"] == token_hash(token)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [entry]}))
    found = TokenStore(str(path)).authenticate(token)
    assert found is not None and found.name == "reporting"
    assert TokenStore(str(path)).authenticate(token + "x") is None


@pytest.mark.parametrize(
    ("permissions", "action", "task", "allowed"),
    [
        ({"generate_report": ["submit"], "*": ["read"]}, "submit", "generate_report", True),
        ({"generate_report": ["submit"], "*": ["read"]}, "submit", "cleanup_old_data", False),
        ({"generate_report": ["submit"], "*": ["read"]}, "read", "cleanup_old_data", True),
        ({"generate_report": ["submit"], "*": ["read"]}, "revoke", "generate_report", False),
        ({"refresh_*": ["*"]}, "revoke", "refresh_market_data", True),
        ({"refresh_*": ["*"]}, "read", "compute_index", False),
        ({"refresh_*": ["*"]}, "read", "", False),  # a name the API does not know
        ({"*": ["revoke"]}, "revoke", "", True),
    ],
)
def test_patterns_and_actions(
    permissions: dict[str, list[str]], action: str, task: str, allowed: bool
) -> None:
    entry = TokenEntry.model_validate({"name": "t", "sha256": "0" * 64, "permissions": permissions})
    assert entry.may(action, task) is allowed  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("{broken", "file"),
        ('{"tokens": [{"name": "a", "sha256": "short", "permissions": {}}]}', "tokens.0.sha256"),
        (
            '{"tokens": [{"name": "a", "sha256": "' + "0" * 64 + '", "permissions": '
            '{"*": ["delete"]}}]}',
            "tokens.0.permissions.*.0",
        ),
        (
            '{"tokens": [{"name": "a", "sha256": "' + "0" * 64 + '", "permissions": {}},'
            '{"name": "a", "sha256": "' + "1" * 64 + '", "permissions": {}}]}',
            "tokens",
        ),
    ],
)
def test_a_bad_tokens_file_names_the_field(text: str, where: str) -> None:
    with pytest.raises(TokensFileError, match=rf"^tokens.json: {where}: "):
        parse_tokens(text, "tokens.json")


def envelope(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "body": base64.b64encode(b"[[], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "ping", "id": "x"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "tag",
            "delivery_info": {"exchange": "", "routing_key": "default"},
        },
    }
    value.update(changes)
    return value


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (envelope(), None),
        (envelope(body=None), None),
        ([1, 2], "JSON list, not an object"),
        (envelope(body="abc"), "body is not valid base64"),
        (envelope(body=5), "'body' is a int"),
        (envelope(headers=[1]), "'headers' is not an object"),
        (envelope(properties=None), "'properties' is missing"),
        (envelope(properties={"delivery_tag": 1}), "'properties.delivery_tag'"),
        (envelope(properties={"delivery_tag": "t"}), "'properties.delivery_info'"),
        (
            envelope(
                properties={
                    "delivery_tag": "t",
                    "delivery_info": {"exchange": "", "routing_key": "q"},
                    "body_encoding": "rot13",
                }
            ),
            "unknown 'properties.body_encoding'",
        ),
        (envelope(**{"content-type": ["a"]}), "'content-type' is not a string"),
    ],
)
def test_envelope_problems(payload: object, problem: str | None) -> None:
    found = envelope_problem(payload)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
