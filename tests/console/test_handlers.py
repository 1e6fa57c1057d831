"""The console's pages over HTTP, without a browser: sign-in and its cookie, CSRF on
every form, tenant isolation, and what each page shows from the real services."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tensafe.common.config import load_config
from tensafe.common.errors import ConfigError
from tensafe.console.config import ConsoleConfig
from tensafe.console.session import csrf_token_for, session_from_token, tokens_match
from tests.console.conftest import CSRF_INPUT, NONCE_INPUT, Stack

pytestmark = pytest.mark.timeout(600)


# -- without the stack ---------------------------------------------------------------------


def test_csrf_token_is_bound_to_the_session_token() -> None:
    first, second = csrf_token_for("a.b.c"), csrf_token_for("a.b.d")
    assert first == csrf_token_for("a.b.c") and first != second
    assert tokens_match(first, first)
    assert not tokens_match(first, second)
    assert not tokens_match(first, None)
    assert not tokens_match(first, "")


def test_a_cookie_that_is_not_a_token_is_no_session() -> None:
    assert session_from_token("not-a-jwt") is None
    assert session_from_token("a.!!!.c") is None


def test_config_names_the_bad_setting() -> None:
    base = {"TENSAFE_TRAINER_URL": "h:1", "TENSAFE_AUTH_URL": "h:2"}
    with pytest.raises(ConfigError, match="TENSAFE_REGISTRY_URL"):
        load_config(ConsoleConfig, {**base, "TENSAFE_REGISTRY_URL": "http://h:3"})
    with pytest.raises(ConfigError, match="TENSAFE_TLS_KEY_FILE"):
        load_config(
            ConsoleConfig,
            {**base, "TENSAFE_REGISTRY_URL": "h:3", "TENSAFE_TLS_CERT_FILE": __file__},
        )
    with pytest.raises(ConfigError, match="TENSAFE_TLS_CA_FILE"):
        load_config(
            ConsoleConfig,
            {
                **base,
                "TENSAFE_REGISTRY_URL": "h:3",
                "TENSAFE_TLS_CLIENT_CERT_FILE": __file__,
                "TENSAFE_TLS_CLIENT_KEY_FILE": __file__,
            },
        )
    config = load_config(ConsoleConfig, {**base, "TENSAFE_REGISTRY_URL": "h:3"})
    assert not config.secure_cookie
    assert dataclasses.replace(config, console_secure_cookie=True).secure_cookie


# -- against the stack ---------------------------------------------------------------------


class Browser:
    """An HTTP client that keeps the console's cookies (as a browser does)."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False) as response:
            return response.status, await response.text(), response

    async def post(self, path: str, data: dict[str, str], **kwargs: Any) -> tuple[int, str]:
        async with self.http.post(
            self.base + path, data=data, allow_redirects=False, **kwargs
        ) as response:
            return response.status, await response.text()

    async def login(self, api_key: str) -> aiohttp.ClientResponse:
        _, page, _ = await self.get("/login")
        nonce = NONCE_INPUT.search(page)
        assert nonce is not None
        async with self.http.post(
            self.base + "/login",
            data={"login_nonce": nonce.group(1), "api_key": api_key},
            allow_redirects=False,
        ) as response:
            assert response.status == 303, await response.text()
            assert response.headers["Location"] == "/runs"
            return response

    async def csrf(self) -> str:
        _, page, _ = await self.get("/audit")
        match = CSRF_INPUT.search(page)
        assert match is not None
        return match.group(1)


@pytest.fixture
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Browser(http, stack.console_url)


async def test_every_page_needs_a_session(browser: Browser) -> None:
    for path in ("/runs", "/datasets", "/registry", "/audit", "/privacy-audits"):
        status, _, response = await browser.get(path)
        assert (status, response.headers["Location"]) == (303, "/login"), path
    status, body, _ = await browser.get("/runs/x/progress.json")
    assert status == 401 and "signed out" in body


async def test_sign_in_sets_a_strict_httponly_cookie(stack: Stack, browser: Browser) -> None:
    response = await browser.login(stack.tenant.api_key)
    cookie = SimpleCookie(response.headers["Set-Cookie"])["tensafe_console_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    assert not cookie["secure"], "plain HTTP on loopback: a Secure cookie would be dropped"
    assert cookie.value.count(".") == 2  # the access token auth issued, nothing else
    assert "Content-Security-Policy" in response.headers


async def test_a_wrong_key_or_a_missing_nonce_does_not_sign_in(
    stack: Stack, browser: Browser
) -> None:
    _, page, _ = await browser.get("/login")
    nonce = NONCE_INPUT.search(page)
    assert nonce is not None
    status, body = await browser.post(
        "/login", {"login_nonce": nonce.group(1), "api_key": "tsk_not-a-key"}
    )
    assert status == 401 and "was not accepted" in body
    status, _ = await browser.post("/login", {"api_key": stack.tenant.api_key})
    assert status == 403
    status, _ = await browser.post(
        "/login", {"login_nonce": "forged", "api_key": stack.tenant.api_key}
    )
    assert status == 403


async def test_runs_show_the_tenants_clients_with_their_epsilon(
    stack: Stack, browser: Browser, trained: dict[str, Any]
) -> None:
    await browser.login(stack.tenant.api_key)
    status, page, _ = await browser.get("/runs")
    assert status == 200
    assert trained["client_id"] in page
    assert f"ε {trained['epsilon']:.3f} / 4.000" in page
    status, run, _ = await browser.get(f"/runs/{trained['client_id']}")
    assert status == 200 and "Loss and ε against steps" in run
    # The checkpoints table lists the state saved after the first step.
    checkpoints = run[run.index('id="checkpoints"') :]
    assert "after-one" in checkpoints and trained["checkpoint"] in checkpoints
    assert '<td class="num">1</td>' in checkpoints
    status, _body, response = await browser.get(f"/runs/{trained['client_id']}/progress.json")
    progress = await response.json()
    assert status == 200 and progress["step"] == 2
    assert math.isclose(progress["epsilon"], trained["epsilon"], rel_tol=1e-9)
    assert progress["epsilon_budget"] == pytest.approx(4.0)
    # The chart's points are the trainer's history: each step's loss and ε as the SDK
    # saw them when it took the step.
    assert progress["points"] == [
        [number, pytest.approx(epsilon, rel=1e-9), pytest.approx(loss, rel=1e-9)]
        for number, (loss, epsilon) in enumerate(trained["observed"], start=1)
    ]
    # The page embeds the same history, so a reopened page draws the whole run.
    assert json.dumps(progress["points"]) in html.unescape(run)


async def test_another_tenants_run_is_not_found(
    stack: Stack, browser: Browser, trained: dict[str, Any]
) -> None:
    await browser.login(stack.other_tenant.api_key)
    status, page, _ = await browser.get("/runs")
    assert status == 200 and trained["client_id"] not in page
    status, _, _ = await browser.get(f"/runs/{trained['client_id']}")
    assert status == 404
    status, _, _ = await browser.get(f"/runs/{trained['client_id']}/progress.json")
    assert status == 404
    status, _, _ = await browser.get(f"/registry/{trained['adapter']}/{trained['version']}")
    assert status == 404


async def test_forms_need_the_sessions_csrf_token(stack: Stack, browser: Browser) -> None:
    await browser.login(str(stack.connection["api_key"]))  # the platform admin
    status, body = await browser.post("/audit/verify", {})
    assert status == 403 and "CSRF" in body
    status, _ = await browser.post("/audit/verify", {"csrf_token": "forged"})
    assert status == 403
    # Another session's token is no good either.
    status, _ = await browser.post("/audit/verify", {"csrf_token": csrf_token_for("x.y.z")})
    assert status == 403
    status, body = await browser.post("/audit/verify", {"csrf_token": await browser.csrf()})
    assert status == 200
    checked = re.search(r"Chain verified: (\d+) entries", body)
    assert checked is not None and int(checked.group(1)) > 10, body
    status, body = await browser.post(
        "/audit/verify", {"csrf_token": await browser.csrf()}, headers={"HX-Request": "true"}
    )
    assert status == 200 and "Chain verified" in body
    assert "<html" not in body  # htmx gets the verdict alone


async def test_the_audit_log_takes_the_admin_scope_as_on_grpc(
    stack: Stack, browser: Browser
) -> None:
    await browser.login(stack.tenant.api_key)  # a trainer principal: no admin scope
    status, body, _ = await browser.get("/audit")
    assert status == 403 and "missing scope admin" in body
    status, body = await browser.post(
        "/audit/verify", {"csrf_token": await browser.csrf()}, headers={"HX-Request": "true"}
    )
    assert status == 200 and "only a platform admin may walk it" in body


async def test_package_page_verifies_the_signature(
    stack: Stack, browser: Browser, trained: dict[str, Any]
) -> None:
    await browser.login(stack.tenant.api_key)
    status, page, _ = await browser.get(f"/registry/{trained['adapter']}/{trained['version']}")
    assert status == 200
    assert "signature OK" in page
    assert f"ε = {trained['epsilon']:.3f}" in page
    status, page, _ = await browser.get(f"/registry/{trained['adapter']}")
    assert status == 200 and f"v{trained['version']}" in page
    status, page, _ = await browser.get("/registry/console-adapter/0")
    assert status == 400


async def test_the_other_pages_render(stack: Stack, browser: Browser) -> None:
    await browser.login(stack.tenant.api_key)
    for path, text in (
        ("/datasets", "Datasets"),
        ("/registry", "console-adapter"),
        ("/privacy-audits", "Privacy audits"),
        ("/static/htmx.min.js", "htmx"),
    ):
        status, page, _ = await browser.get(path)
        assert status == 200 and text in page, path
    status, _, _ = await browser.get("/no-such-page")
    assert status == 404


async def test_sign_out_revokes_the_token(stack: Stack, browser: Browser) -> None:
    await browser.login(stack.tenant.api_key)
    token = browser.http.cookie_jar.filter_cookies(URL(browser.base))["tensafe_console_session"]
    status, _ = await browser.post("/logout", {"csrf_token": await browser.csrf()})
    assert status == 303
    # The old cookie, replayed, is refused by auth: the token was revoked, not just dropped.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as replay:
        replay.cookie_jar.update_cookies(
            {"tensafe_console_session": token.value}, URL(browser.base)
        )
        async with replay.get(browser.base + "/audit", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (303, "/login")
