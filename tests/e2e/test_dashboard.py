"""The operator dashboard of ``learnledger serve --http-port``: auth, pages, JSON, and a real browser."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.client import LedgerClient
from server.grpc_server import LedgerServer
from server.headless import FLAGS
from tests.e2e.conftest import SPEC, TOKENS, token_table

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not IN_CI, reason=f"{CHROMIUM} missing (apt-get install chromium)"
)
AUDIT = TOKENS["auditor"][0]
HOSTILE = "<script>alert('x')</script> & \"quotes\""


class Reply:
    """An HTTP reply: status, headers (lower-case names) and body text."""

    def __init__(self, status: int, headers: dict[str, str], body: str):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def fetch(base: str, path: str, *, token: str | None = None, cookie: str | None = None, method: str = "GET") -> Reply:
    """One request, redirects not followed (so a login's 303 and cookie are visible)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = cookie
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode())
    finally:
        conn.close()


def wait_for_version(client: LedgerClient, model: str, at_least: int, timeout: float = 30.0) -> int:
    """Poll until the model's version reaches ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        version = client.get_model(model).version
        if version >= at_least or time.monotonic() > deadline:
            return version
        time.sleep(0.05)


@pytest.fixture
def dashboard(start_server: Callable[..., LedgerServer], runtime: Any) -> str:
    """A secured server with the dashboard on a free port, and two models with a history.

    ``credit`` learned 3 updates, then the log records (as the learner would) a gate
    refusal and a drift detection that paused it; an operator resumed it and rolled it
    back. ``churn`` learned 2 updates. Returns the dashboard's base URL.
    """
    server = start_server(tokens=token_table(), http_port=0)
    assert server.dashboard is not None
    with LedgerClient(server.address, token=TOKENS["admin"][0], retries=0) as c:
        for name in ("credit", "churn"):
            c.register_model(name, SPEC)
        served: dict[str, list[str]] = {}
        for name, n in (("credit", 12), ("churn", 8)):
            served[name] = [
                p.prediction_id for p in c.predict_batch(name, [[float(i), 1.0 - i, 0.5 * i] for i in range(n)])
            ]
            for i, pid in enumerate(served[name]):
                c.feedback(pid, float(i % 2))
            assert wait_for_version(c, name, n // 4 + 1) == n // 4 + 1
        ledger = runtime.ledger
        model = ledger.get_model("credit")
        batch = tuple(uuid.UUID(pid) for pid in served["credit"][:4])
        model.reject_update(
            batch, "holdout loss worse: t = 3.2 > 1.7", 0.41, 0.58, "learner", through=model.learned_through,
            gate={"t_statistic": 3.2, "critical": 1.7},
        )  # fmt: skip
        model.detect_drift("page_hinkley", batch[0], {"statistic": 61.5, "threshold": 50.0}, "pause", "learner")
        ledger.save(model)
        ledger.pause_model("credit", f"drift: page_hinkley {HOSTILE}", "learner")
        c.resume("credit", "drift investigated")
        c.rollback("credit", 3, "bad batch from source crm-7")
    return server.dashboard.url


def test_auth_matrix(dashboard: str) -> None:
    for path in ("/", "/api/status", "/models/credit", "/models/credit/report"):
        assert fetch(dashboard, path).status == 401
        assert fetch(dashboard, path, token="not-a-token-at-all").status == 401
        for who in ("predictor", "labeler", "operator"):
            assert fetch(dashboard, path, token=TOKENS[who][0]).status == 403, (who, path)
    assert fetch(dashboard, "/", token=AUDIT).status == 200
    assert fetch(dashboard, "/", token=TOKENS["admin"][0]).status == 200
    refused = fetch(dashboard, "/")
    assert refused.headers["www-authenticate"].startswith("Bearer") and AUDIT not in refused.body
    # Read-only: no method but GET and HEAD
    assert fetch(dashboard, "/", token=AUDIT, method="POST").status == 501
    assert fetch(dashboard, "/", token=AUDIT, method="HEAD").status == 200


def test_a_token_in_the_url_becomes_an_http_only_session_cookie(dashboard: str) -> None:
    assert fetch(dashboard, f"/?token={TOKENS['predictor'][0]}").status == 403
    assert fetch(dashboard, "/?token=wrong-token-0000").status == 401
    login = fetch(dashboard, f"/models/credit?token={AUDIT}")
    assert login.status == 303 and login.headers["location"] == "/models/credit"  # the token leaves the URL
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and AUDIT not in cookie
    session = cookie.split(";")[0]
    assert fetch(dashboard, "/models/credit", cookie=session).status == 200
    assert fetch(dashboard, "/", cookie="learnledger_session=forged").status == 401


def test_portfolio_json(dashboard: str) -> None:
    reply = fetch(dashboard, "/api/status", token=AUDIT)
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    rows = {r["name"]: r for r in reply.json()["models"]}
    assert list(rows) == ["credit", "churn"]
    credit = rows["credit"]
    assert (credit["state"], credit["updates_applied"], credit["updates_rejected"], credit["rollbacks"]) == (
        "learning",
        3,
        1,
        1,
    )
    assert credit["drift"]["detections"] == 1 and credit["drift"]["last_detector"] == "page_hinkley"
    assert rows["churn"]["updates_applied"] == 2 and rows["churn"]["lag"]["labels"] == 0


def test_portfolio_page_lists_every_model(dashboard: str) -> None:
    page = fetch(dashboard, "/", token=AUDIT)
    assert page.status == 200 and "<h1>Model portfolio</h1>" in page.body
    assert '<a href="/models/credit">credit</a>' in page.body and '<a href="/models/churn">churn</a>' in page.body
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no scripts
    assert "<script" not in page.body


def test_model_page_shows_the_timeline_and_links_to_the_reports(dashboard: str) -> None:
    page = fetch(dashboard, "/models/credit", token=AUDIT).body
    assert "<h1>Model “credit”</h1>" in page
    for text in (
        "holdout loss worse: t = 3.2 &gt; 1.7",  # the gate's refusal, with its figures
        "t_statistic = 3.2",
        "page_hinkley detected drift; action: pause",
        "statistic = 61.5",
        "learning paused: drift: page_hinkley",
        "learning resumed: drift investigated",
        "rolled back to version 3: bad batch from source crm-7",
        "No rollout in progress",
    ):
        assert text in page, text
    # user-controlled text is escaped, never markup
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("<svg") == 3  # accuracy, loss, timeline strip
    assert 'href="/models/credit/report"' in page
    explain_links = [part.split('"')[0] for part in page.split('href="/predictions/')[1:]]
    assert explain_links and all(link.endswith("/explain") for link in explain_links)


def test_report_and_explanation_pages_render(dashboard: str) -> None:
    report = fetch(dashboard, "/models/churn/report", token=AUDIT)
    assert report.status == 200 and "What model “churn” did" in report.body
    model_page = fetch(dashboard, "/models/churn", token=AUDIT).body
    link = "/predictions/" + model_page.split('href="/predictions/')[1].split('"')[0]
    explanation = fetch(dashboard, link, token=AUDIT)
    assert explanation.status == 200 and "The main reasons" in explanation.body
    assert fetch(dashboard, "/models/nope", token=AUDIT).status == 404
    assert fetch(dashboard, "/predictions/not-a-uuid/explain", token=AUDIT).status == 400
    assert fetch(dashboard, f"/predictions/{uuid.uuid4()}/explain", token=AUDIT).status == 404
    assert fetch(dashboard, "/models/churn/report?from=yesterday", token=AUDIT).status == 400


def test_without_tokens_the_dashboard_is_open_on_loopback_only(start_server: Callable[..., LedgerServer]) -> None:
    server = start_server(host="0.0.0.0", http_port=0)
    assert server.dashboard is not None
    assert server.dashboard.host == "127.0.0.1" and server.dashboard.url.startswith("http://127.0.0.1:")
    assert fetch(server.dashboard.url, "/").status == 200


def test_with_tls_files_the_dashboard_speaks_https_only(
    start_server: Callable[..., LedgerServer], tmp_path: Path
) -> None:
    from tests.e2e.test_grpc_tls import _self_signed

    cert, key = _self_signed(tmp_path)
    server = start_server(tokens=token_table(), tls_cert=cert, tls_key=key, http_port=0)
    assert server.dashboard is not None and server.dashboard.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("localhost", server.dashboard.port, timeout=30, context=context)
    try:
        conn.request("GET", f"/?token={AUDIT}")
        login = conn.getresponse()
        login.read()
        assert login.status == 303 and "; Secure" in login.headers["Set-Cookie"]
    finally:
        conn.close()
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        fetch(f"http://127.0.0.1:{server.dashboard.port}", "/", token=AUDIT)


@needs_chromium
@pytest.mark.parametrize(("path", "heading"), [("/", "Model portfolio"), ("/models/credit", "Model “credit”")])
def test_pages_render_in_headless_chromium(dashboard: str, path: str, heading: str, tmp_path: Path) -> None:
    # Logged in the way a person would: the token once in the URL, then the cookie.
    url = f"{dashboard}{path}?token={AUDIT}"
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, profile, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert f"<h1>{heading}</h1>" in dom.stdout, dom.stderr[-2000:]
    assert "credit" in dom.stdout and "<h1>401</h1>" not in dom.stdout
    png = tmp_path / "page.png"
    shot = subprocess.run(
        [CHROMIUM, *FLAGS, profile, f"--screenshot={png}", "--window-size=1280,1000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.exists(), shot.stderr[-2000:]
    from PIL import Image, ImageChops

    with Image.open(png) as image:
        assert image.size == (1280, 1000)
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the page rendered as (almost) a single colour"
    # Not blank: the ink spans the table's width and more than a heading's height.
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
    assert box is not None and box[2] - box[0] > 1000 and box[3] - box[1] > 150, box
