"""The read-only operator dashboard: ``learnledger serve --http-port N``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread beside the gRPC server, reading the
same ledger. Pages: ``/`` (portfolio), ``/models/<name>`` (one model's history),
``/models/<name>/report`` (the regulator report), ``/predictions/<id>/explain`` (an
explanation) and ``/api/status`` (JSON). Only GET and HEAD exist: nothing here writes.

Authentication is the gRPC server's: with a tokens file every page needs a token with
the ``audit`` role, as ``Authorization: Bearer <token>`` or once as ``?token=<token>``,
which is exchanged for an HttpOnly session cookie (the token itself never goes into a
cookie, and the redirect drops it from the address bar). Without tokens the dashboard
is open and, like gRPC, bound to loopback.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode, urlsplit
from uuid import UUID

import grpc
import orjson

from domain.errors import InvalidArgumentError
from server.auth import Caller, TokenTable
from server.dashboard_html import error_page, explain_url, render_model, render_portfolio
from server.errors import message_for, status_for
from server.services import LedgerService

log = logging.getLogger(__name__)

ROLE = "audit"
COOKIE = "learnledger_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 1000
RECENT_PREDICTIONS = 5
REQUEST_TIMEOUT_S = 30.0
# Scripts, frames and fetched assets are not needed by any page; forbid them all.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HTTP_FOR_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
}


class Sessions:
    """Session ids handed out for a ``?token=`` login: id → caller, bounded and expiring."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, tuple[Caller, float]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, caller: Caller) -> str:
        """A new session id for ``caller`` (the oldest session goes when full)."""
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._by_id[session] = (caller, time.monotonic() + self.ttl_s)
            while len(self._by_id) > self.max_sessions:
                self._by_id.popitem(last=False)
        return session

    def lookup(self, session: str) -> Caller | None:
        """The caller of a live session, or None."""
        with self._lock:
            found = self._by_id.get(session)
            if found is None:
                return None
            if found[1] < time.monotonic():
                del self._by_id[session]
                return None
            return found[0]


class Dashboard:
    """The dashboard's HTTP server, listening from construction until ``close``."""

    def __init__(
        self,
        service: LedgerService,
        host: str,
        port: int,
        tokens: TokenTable | None,
        *,
        tls: tuple[Path, Path] | None = None,
    ):
        """Bind ``host:port`` (0: a free port) and serve in a daemon thread.

        Args:
            service: the service whose ledger the pages read.
            host: interface (the gRPC server's, already forced to loopback without tokens).
            port: TCP port; 0 picks one.
            tokens: the token table, or None for no authentication.
            tls: ``(certificate chain, private key)`` PEM files to serve HTTPS with.
        """
        self.service = service
        self.tokens = tokens
        self.sessions = Sessions()
        self.secure = tls is not None
        self._server = _Server((host.strip("[]"), port), _Handler)
        self._server.dashboard = self
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            # The handshake runs on the request's own thread (``_Handler.setup``), so one
            # silent client cannot stall the accept loop.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The dashboard's base URL."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    # --- pages ------------------------------------------------------------------------------

    def portfolio(self) -> str:
        """``/``."""
        from projections.status import list_status

        return render_portfolio(list_status(self.service.ledger, now=datetime.now(UTC)))

    def status_json(self) -> bytes:
        """``/api/status``: the same object as ``learnledger status --json``."""
        from projections.status import list_status

        rows = list_status(self.service.ledger, now=datetime.now(UTC))
        return orjson.dumps({"models": [r.to_json() for r in rows]})

    def model_page(self, name: str) -> str:
        """``/models/<name>``."""
        from domain.model import Model
        from projections.performance import performance_by_version
        from projections.status import get_status
        from projections.timeline import loss_series, model_timeline

        ledger = self.service.ledger
        status = get_status(ledger, name, now=datetime.now(UTC))
        events = ledger.get_model_events(status.model_id)
        model = ledger.get_model(name)
        performance = performance_by_version(ledger, model.id, model.spec).to_json()
        learned = next((e for e in reversed(events) if isinstance(e, Model.UpdateApplied)), None)
        recent = [str(p) for p in learned.prediction_ids[-RECENT_PREDICTIONS:]] if learned else []
        return render_model(status, model_timeline(events), performance, loss_series(events), recent)

    def report_page(self, name: str, query: dict[str, list[str]]) -> str:
        """``/models/<name>/report[?from=ISO&to=ISO]`` (default: registration until now)."""
        from projections.model_report import model_report
        from server.model_report_html import render_model_report_html

        ledger = self.service.ledger
        model = ledger.get_model(name)
        start = _time(query, "from") or ledger.get_model_events(model.id, lte=1)[0].timestamp
        end = _time(query, "to") or datetime.now(UTC)
        return render_model_report_html(model_report(ledger, self.service.replayer, name, start, end))

    def explain_page(self, text: str) -> str:
        """``/predictions/<id>/explain``: the same page as ``learnledger explain --format html``."""
        from projections.explain import explain_prediction
        from projections.performance import performance_by_version
        from server.report_html import render_explanation_html

        try:
            prediction_id = UUID(text.strip())
        except ValueError:
            raise InvalidArgumentError(f"not a prediction id: {text!r}") from None
        ledger = self.service.ledger
        # server.explain_command.build_report, on this process's ledger instead of a new runtime.
        explanation = explain_prediction(ledger, self.service.replayer, prediction_id)
        model = ledger.get_model(explanation.decision.model)
        series = performance_by_version(ledger, model.id, model.spec, upto=explanation.attestation.log_position)
        return render_explanation_html({**explanation.to_json(), "performance": series.to_json()})


class _Reply(NamedTuple):
    """What a route answers: a status and a body, or a redirect's target."""

    status: int
    body: bytes = b""
    content_type: str = "text/html"
    location: str = ""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or failed the TLS handshake; the default prints a traceback.
        log.debug("dashboard: a request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "learnledger-dashboard"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S  # a stalled client holds one thread only this long

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def do_GET(self) -> None:
        self._respond()

    def do_HEAD(self) -> None:
        self._respond()

    def _respond(self) -> None:
        app = self.server.dashboard
        self.cookie = ""  # set only by a ?token= login
        url = urlsplit(self.path)
        # "//host/..." would make the login redirect below leave this server.
        path = "/" + url.path.lstrip("/")
        query = parse_qs(url.query)
        reply = self._authenticate(app, path, query)
        if reply is None:
            try:
                reply = _route(app, path, query)
            except Exception as exc:  # the one place a page's error becomes an HTTP status
                code = status_for(exc)
                status = HTTP_FOR_GRPC.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
                if status == HTTPStatus.INTERNAL_SERVER_ERROR:
                    log.exception("dashboard: %s failed", path)
                reply = _Reply(status, error_page(status, message_for(exc, code)).encode())
        self._send(reply)

    def _authenticate(self, app: Dashboard, path: str, query: dict[str, list[str]]) -> _Reply | None:
        """None when the request may proceed; otherwise the reply that refuses it (or logs in)."""
        if app.tokens is None:
            return None
        caller: Caller | None
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if header:
            caller = app.tokens.lookup(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        elif "token" in query:
            caller = app.tokens.lookup(query["token"][0])
            if caller is not None and ROLE in caller.roles:
                # Swap the token for a session cookie and drop it from the address bar.
                rest = urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs])
                self.cookie = f"{COOKIE}={app.sessions.open(caller)}; Path=/; HttpOnly; SameSite=Strict"
                self.cookie += f"; Max-Age={SESSION_TTL_S}" + ("; Secure" if app.secure else "")
                return _Reply(HTTPStatus.SEE_OTHER, location=path + (f"?{rest}" if rest else ""))
        else:
            caller = app.sessions.lookup(self._session_cookie())
        if caller is None:
            message = "a token with the audit role is needed (Authorization: Bearer <token>, or ?token=<token>)"
            return _Reply(HTTPStatus.UNAUTHORIZED, error_page(HTTPStatus.UNAUTHORIZED, message).encode())
        if ROLE not in caller.roles:
            message = f"{caller.name!r} lacks the {ROLE!r} role the dashboard needs"
            return _Reply(HTTPStatus.FORBIDDEN, error_page(HTTPStatus.FORBIDDEN, message).encode())
        return None

    def _session_cookie(self) -> str:
        try:
            cookies = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return ""
        morsel = cookies.get(COOKIE)
        return morsel.value if morsel is not None else ""

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        if reply.location:
            self.send_header("Location", reply.location)
        self.send_header("Content-Type", f"{reply.content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(reply.body)))
        if reply.status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="learnledger"')
        cookie = getattr(self, "cookie", "")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        # Access lines at debug level: the default handler writes every request to stderr.
        log.debug("dashboard %s: " + format, self.address_string(), *args)


def _route(app: Dashboard, path: str, query: dict[str, list[str]]) -> _Reply:
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    match parts:
        case []:
            return _Reply(HTTPStatus.OK, app.portfolio().encode())
        case ["api", "status"]:
            return _Reply(HTTPStatus.OK, app.status_json(), "application/json")
        case ["models", name]:
            return _Reply(HTTPStatus.OK, app.model_page(name).encode())
        case ["models", name, "report"]:
            return _Reply(HTTPStatus.OK, app.report_page(name, query).encode())
        case ["predictions", "explain"]:
            return _Reply(HTTPStatus.SEE_OTHER, location=explain_url((query.get("id") or [""])[0].strip()))
        case ["predictions", prediction_id, "explain"]:
            return _Reply(HTTPStatus.OK, app.explain_page(prediction_id).encode())
    return _Reply(HTTPStatus.NOT_FOUND, error_page(HTTPStatus.NOT_FOUND, f"no page at {path}").encode())


def _time(query: dict[str, list[str]], key: str) -> datetime | None:
    values = query.get(key)
    if not values or not values[0].strip():
        return None
    try:
        parsed = datetime.fromisoformat(values[0].strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(f"{key}: not an ISO 8601 time: {values[0]!r}") from None
    if parsed.tzinfo is None:
        raise InvalidArgumentError(f"{key}: the time needs a timezone (e.g. Z or +00:00)")
    return parsed
