"""The command line's own parsing (no service started)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import typer

from paramserver.cli import _resources


def test_coordinator_resources_parse_name_amount_pairs() -> None:
    assert _resources(["head=0.01", "ctl=1"]) == {"head": 0.01, "ctl": 1.0}
    assert _resources([]) == {}


@pytest.mark.parametrize("bad", ["head", "=1", "head=lots", "head="])
def test_a_bad_coordinator_resource_is_a_usage_error_naming_the_option(bad: str) -> None:
    with pytest.raises(typer.BadParameter) as err:
        _resources([bad])
    assert "--coordinator-resource" in str(err.value.param_hint) and repr(bad) in str(err.value)


def test_serve_takes_one_source_of_credentials_and_tls_needs_cert_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from paramserver.access import hash_token
    from paramserver.cli import ADMIN_TOKEN_ENV, _auth, _tls

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert _auth(None, None) is None
    token_file = tmp_path / "admin.txt"
    token_file.write_text("an-admin-token-of-some-length\n")
    auth = _auth(str(token_file), None)
    assert auth is not None and auth.tenants[0].token_sha256 == hash_token("an-admin-token-of-some-length")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "another-admin-token-0123")
    with pytest.raises(typer.BadParameter, match="one of"):
        _auth(str(token_file), None)
    assert _auth(None, None) is not None  # the environment alone
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "short")
    with pytest.raises(typer.BadParameter, match="16"):
        _auth(None, None)
    with pytest.raises(typer.BadParameter, match="both"):
        _tls(str(token_file), None, None)
    with pytest.raises(typer.BadParameter, match="cert_file"):
        _tls(str(tmp_path / "missing.pem"), str(token_file), None)


def test_tenants_file(tmp_path: Path) -> None:
    from paramserver.access import Quota, hash_token, load_tenants

    good = tmp_path / "tenants.json"
    good.write_text(json.dumps({"tenants": [{"name": "a", "token_sha256": hash_token("x" * 20), "quota": {"shards": 4, "streams": 9}},
                                            {"name": "b", "token_sha256": hash_token("y" * 20).upper()}]}))  # fmt: skip
    auth = load_tenants(good)
    assert auth.admin("x" * 20) == auth.tenants[0] and auth.tenants[0].quota == Quota(shards=4, streams=9)
    assert auth.admin("y" * 20) is not None and auth.admin("z" * 20) is None
    zeros = "0" * 64
    cases = [
        ({"name": "a", "token_sha256": "abc"}, "64 hex"),
        ({"name": "a", "token_sha256": zeros, "quota": {"gpus": 1}}, "unknown"),
        ({"name": "a", "token_sha256": zeros, "quota": {"shards": -1}}, ">= 0"),
        ({"name": "", "token_sha256": zeros}, "name"),
    ]
    for bad, match in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"tenants": [bad]}))
        with pytest.raises(ValueError, match=match):
            load_tenants(path)


def test_hash_token_command_and_the_exposure_warning() -> None:
    from typer.testing import CliRunner

    from paramserver.access import hash_token
    from paramserver.cli import app
    from paramserver.server import exposure_warning

    out = CliRunner().invoke(app, ["hash-token"], input="a-secret-token\n")
    assert out.exit_code == 0 and out.stdout.strip() == hash_token("a-secret-token")
    assert exposure_warning("0.0.0.0", secured=False).startswith("WITHOUT credentials")
    assert exposure_warning("0.0.0.0", secured=True) == "" and exposure_warning("127.0.0.1", secured=False) == ""


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--shard-port-range", "9-1"], "--shard-port-range"),
        (["--shard-port-range", "lots"], "--shard-port-range"),
        (["--placement", "random"], "--placement"),
        (["--log-format", "xml"], "log format"),
        (["--log-level", "LOUD"], "log level"),
        (["--warm-shards", "-1"], "--warm-shards"),
    ],
)
def test_serve_refuses_bad_placement_ports_and_log_options_before_starting(
    args: list[str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from paramserver import server
    from paramserver.cli import app

    started: list[object] = []
    monkeypatch.setattr(server, "serve", started.append)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # serve configures the root logger: put it back
    try:
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2 and named in result.output, result.output
        assert started == []
        ok = CliRunner().invoke(
            app, ["serve", "--shard-port-range", "52000-52009", "--placement", "pack", "--log-format", "json", "--warm-shards", "0"]
        )
        assert ok.exit_code == 0, ok.output
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    (config,) = started
    assert (str(config.shard_port_range), config.placement, config.warm_shards) == ("52000-52009", "pack", 0)  # type: ignore[attr-defined]


def test_serve_dashboard_without_ray_default_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from paramserver import server
    from paramserver.cli import app

    started: list[object] = []
    monkeypatch.setattr(server, "serve", started.append)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp_cors" else real(name, *a))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(app, ["serve", "--dashboard"])
        assert result.exit_code == 2 and "paramserver[dashboard]" in result.output and started == [], result.output
        joined = CliRunner().invoke(app, ["serve", "--dashboard", "--address", "auto"])  # a cluster's dashboard is its own
        assert joined.exit_code == 0 and started, joined.output
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--diloco", "0"], "--diloco"),
        (["--diloco", "7", "--steps", "20"], "--diloco"),
        (["--diloco", "10", "--compression", "int3"], "--compression"),
        (["--diloco", "10", "--pull", "topk"], "--pull"),
        (["--compression", "int8"], "--compression"),
    ],
)
def test_demo_refuses_bad_diloco_options_before_starting(args: list[str], named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from paramserver.cli import app
    from paramserver.demo import diloco, run

    started: list[object] = []
    monkeypatch.setattr(diloco, "run_diloco_demo", lambda *a, **k: started.append((a, k)))
    monkeypatch.setattr(run, "run_demo", lambda *a, **k: started.append((a, k)))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(app, ["demo", *args])
        assert result.exit_code == 2 and named in result.output, result.output
        assert started == []
        ok = CliRunner().invoke(app, ["demo", "--diloco", "10", "--compression", "int8", "--pull", "int8", "--quick"])
        assert ok.exit_code == 0, ok.output
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    ((a, k),) = started
    assert a == (10, "int8") and k["pull_dtype"] == "int8" and k["steps"] == diloco.QUICK_STEPS


@pytest.mark.parametrize("args", [["--pull", "int8"], ["--outer-momentum", "0.9"]])
def test_demo_diloco_options_need_diloco(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from paramserver.cli import app
    from paramserver.demo import run

    monkeypatch.setattr(run, "run_demo", lambda *a, **k: pytest.fail("started"))
    result = CliRunner().invoke(app, ["demo", *args])
    assert result.exit_code == 2 and args[0] in result.output, result.output
