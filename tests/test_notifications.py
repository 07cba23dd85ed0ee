"""The notifier against real servers on 127.0.0.1: aiosmtpd for email, http.server for the Slack webhook.

No database. Backoffs are tiny so the whole file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import time
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from flowdb.notifications import (
    ChannelNotConfigured,
    Delivery,
    Notice,
    NotificationError,
    Notifier,
    NotifierConfig,
    OutboundURLRefused,
)
from flowdb.notifications.notifier import backoff_delay
from flowdb.notifications.outbound import check_address, check_url
from flowdb.settings import Settings

from servers import Collecting, Webhook, free_port

DECIDE_42 = "flowdb approvals decide 42 approve|reject --as <you>"


def send(notifier: Notifier, notice: Notice, attempts: int | None = None) -> Delivery:
    return asyncio.run(notifier.send(notice, attempts))


# --- SMTP -------------------------------------------------------------------------------------------


def email_config(port: int, **overrides: Any) -> NotifierConfig:
    base: dict[str, Any] = dict(
        smtp_host="127.0.0.1", smtp_port=port, smtp_sender="flowdb@example.com", smtp_tls="none",
        attempts=3, backoff_seconds=0.01, timeout_seconds=5.0,
    )
    return NotifierConfig(**(base | overrides))


APPROVAL_MAIL = Notice(
    channel="email", title="Approve invoice 17", text="Please review the invoice.",
    to=("alice@example.com", "Bob <bob@example.org>"), artifacts=("s3://bucket/invoice-17.pdf", "summary.md"),
    approval_id=42, instance_id=7,
)


def test_email_is_delivered_with_subject_recipients_artifacts_and_decide_command(smtp_server: Any) -> None:
    handler, port = smtp_server()
    delivery = send(Notifier(email_config(port)), APPROVAL_MAIL)

    assert delivery == Delivery(
        "email", ok=True, attempts=1,
        detail={"to": ["alice@example.com", "Bob <bob@example.org>"], "smtp": f"127.0.0.1:{port}"},
    )
    [env] = handler.envelopes
    assert env.mail_from == "flowdb@example.com"
    assert env.rcpt_tos == ["alice@example.com", "bob@example.org"]
    [msg] = handler.messages()
    assert msg["Subject"] == "Approve invoice 17"
    assert msg["From"] == "flowdb@example.com"
    assert msg["To"] == "alice@example.com, Bob <bob@example.org>"
    assert msg["X-Flowdb-Approval"] == "42"
    assert handler.bodies() == [
        "Please review the invoice.\n\n"
        "Artifacts:\n- s3://bucket/invoice-17.pdf\n- summary.md\n\n"
        f"Approval 42: decide with\n    {DECIDE_42}\n\n"
        "Instance 7\n"
    ]


def test_email_without_approval_has_no_decide_command(smtp_server: Any) -> None:
    handler, port = smtp_server()
    notice = Notice(channel="email", title="Line one\nline two", text="done", to=["ops@example.com"])  # type: ignore[arg-type]
    assert Notifier(email_config(port)).deliver_once(notice)["to"] == ["ops@example.com"]
    [msg] = handler.messages()
    assert msg["Subject"] == "Line one line two"  # a header is one line
    assert handler.bodies() == ["done\n"]


def test_email_login_when_username_set_and_password_never_in_error(smtp_server: Any) -> None:
    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"flow", b"hunter2-right")
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself

    handler, port = smtp_server(authenticator=authenticator, auth_require_tls=False)
    good = Notifier(email_config(port, smtp_username="flow", smtp_password="hunter2-right"))
    assert send(good, APPROVAL_MAIL).ok
    assert len(handler.envelopes) == 1

    bad = Notifier(email_config(port, smtp_username="flow", smtp_password="hunter2-wrong"))
    delivery = send(bad, APPROVAL_MAIL, attempts=1)
    assert (delivery.ok, delivery.attempts) == (False, 1)
    assert delivery.error is not None
    assert "SMTPAuthenticationError: 535" in delivery.error
    assert "hunter2" not in delivery.error
    assert "hunter2" not in repr(bad.config)
    assert len(handler.envelopes) == 1


def test_rejecting_server_is_retried_with_backoff_and_send_never_raises(smtp_server: Any) -> None:
    handler, port = smtp_server(Collecting(reply="554 rejected"))
    notifier = Notifier(email_config(port, attempts=3, backoff_seconds=0.05))
    started = time.monotonic()
    delivery = send(notifier, APPROVAL_MAIL)
    elapsed = time.monotonic() - started

    assert delivery == Delivery(
        "email", ok=False, attempts=3, error=f"SMTP 127.0.0.1:{port}: SMTPDataError: 554 rejected"
    )
    assert handler.data_calls == 3
    assert elapsed >= 0.05 + 0.10  # slept backoff*1, then backoff*2


def test_nothing_listening_fails_after_the_given_attempts(smtp_server: Any) -> None:
    delivery = send(Notifier(email_config(free_port())), APPROVAL_MAIL, attempts=2)
    assert (delivery.ok, delivery.attempts) == (False, 2)
    assert delivery.error is not None and "ConnectionRefusedError" in delivery.error


def test_tls_modes_are_applied(smtp_server: Any) -> None:
    handler, port = smtp_server()  # plain SMTP, no STARTTLS offered
    starttls = send(Notifier(email_config(port, smtp_tls="starttls")), APPROVAL_MAIL, attempts=1)
    assert starttls.error is not None and "STARTTLS extension not supported" in starttls.error
    implicit = send(Notifier(email_config(port, smtp_tls="ssl", timeout_seconds=2.0)), APPROVAL_MAIL, attempts=1)
    assert implicit.error is not None and "SSL" in implicit.error
    assert handler.envelopes == []


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ((), "email notice has no recipients (to is empty)"),
        (
            ("alice@example.com", "not-an-address", "x@y\nBcc: z@w"),
            "not email addresses: 'not-an-address', 'x@y\\nBcc: z@w'",
        ),
    ],
)
def test_bad_recipients_fail_at_once(smtp_server: Any, to: tuple[str, ...], message: str) -> None:
    handler, port = smtp_server()
    notifier = Notifier(email_config(port))
    notice = Notice(channel="email", title="t", text="x", to=to)
    with pytest.raises(NotificationError) as raised:
        notifier.deliver_once(notice)
    assert str(raised.value) == message
    assert send(notifier, notice) == Delivery("email", ok=False, attempts=1, error=message, retryable=False)
    assert handler.data_calls == 0


# --- Slack webhook ---------------------------------------------------------------------------------


def slack_config(url: str, **overrides: Any) -> NotifierConfig:
    base: dict[str, Any] = dict(
        slack_webhook_url=url, allow_private=True, attempts=3, backoff_seconds=0.01, timeout_seconds=5.0
    )
    return NotifierConfig(**(base | overrides))


APPROVAL_SLACK = Notice(
    channel="slack", title="Approve invoice 17", text="Amount <b>1,200 EUR</b> & more",
    artifacts=("s3://bucket/invoice-17.pdf", "summary.md"), approval_id=42, instance_id=7,
)


def test_slack_post_carries_title_text_artifacts_and_approval(webhook: Any) -> None:
    hook = webhook()
    delivery = send(Notifier(slack_config(hook.url())), APPROVAL_SLACK)

    assert delivery == Delivery("slack", ok=True, attempts=1, detail={"status": 200})
    [req] = hook.requests
    assert req.path == "/services/T000/B000/secret"
    assert req.headers["Host"] == f"127.0.0.1:{hook.port}"
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"
    payload = json.loads(req.body)
    assert payload["text"] == (
        "Approve invoice 17\nAmount &lt;b&gt;1,200 EUR&lt;/b&gt; &amp; more\n"
        "Approval 42: flowdb approvals decide 42 approve|reject --as &lt;you&gt;"
    )
    assert payload["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "Approve invoice 17"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": "Amount &lt;b&gt;1,200 EUR&lt;/b&gt; &amp; more"}},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": "*Artifacts*\n• s3://bucket/invoice-17.pdf\n• summary.md"}},
        {"type": "context", "elements": [
            {"type": "mrkdwn",
             "text": "Approval 42: decide with `flowdb approvals decide 42 approve|reject --as &lt;you&gt;`"},
            {"type": "mrkdwn", "text": "Instance 7"},
        ]},
    ]


def test_slack_connects_to_the_checked_address_with_one_lookup(webhook: Any, monkeypatch: Any) -> None:
    hook = webhook()
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        return real("127.0.0.1" if host == "hooks.flowdb.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    url = f"http://hooks.flowdb.test:{hook.port}/hook?x=1"
    assert Notifier(slack_config(url)).deliver_once(APPROVAL_SLACK) == {"status": 200}
    assert lookups == ["hooks.flowdb.test"]  # resolved once; the connection went to that answer
    [req] = hook.requests
    assert req.path == "/hook?x=1"
    assert req.headers["Host"] == f"hooks.flowdb.test:{hook.port}"  # the original host, not the IP


@pytest.fixture
def https_webhook(webhook: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Webhook:
    """An HTTPS webhook on 127.0.0.1 with a certificate for hooks.flowdb.test, which resolves to 127.0.0.1.

    The test CA is trusted through SSL_CERT_FILE, which ssl.create_default_context() reads: the
    notifier's own verification is what runs.
    """
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.flowdb.test", "other.flowdb.test").configure_cert(server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    real = socket.getaddrinfo

    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host.endswith(".flowdb.test") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    hook: Webhook = webhook(tls=server_tls)
    return hook


def test_https_webhook_verifies_the_certificate_against_the_original_host(https_webhook: Webhook) -> None:
    url = f"https://hooks.flowdb.test:{https_webhook.port}/services/x"
    assert Notifier(slack_config(url)).deliver_once(APPROVAL_SLACK) == {"status": 200}
    [req] = https_webhook.requests
    assert req.headers["Host"] == f"hooks.flowdb.test:{https_webhook.port}"

    # The same server by its IP: the certificate does not name 127.0.0.1, so nothing is sent.
    by_ip = send(Notifier(slack_config(f"https://127.0.0.1:{https_webhook.port}/services/x")), APPROVAL_SLACK, 1)
    assert by_ip.error is not None
    assert "SSLCertVerificationError" in by_ip.error and "127.0.0.1" in by_ip.error
    assert len(https_webhook.requests) == 1


def test_https_webhook_with_untrusted_certificate_fails(https_webhook: Webhook, monkeypatch: Any) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca.pem")  # the test CA is not trusted any more
    delivery = send(Notifier(slack_config(f"https://hooks.flowdb.test:{https_webhook.port}/x")), APPROVAL_SLACK, 1)
    assert (delivery.ok, delivery.attempts) == (False, 1)
    assert delivery.error is not None and "CERTIFICATE_VERIFY_FAILED" in delivery.error
    assert https_webhook.requests == []


def test_loopback_webhook_is_refused_at_send_time_and_receives_nothing(webhook: Any) -> None:
    hook = webhook()
    notifier = Notifier(slack_config(hook.url(), allow_private=False))
    assert notifier.configured("slack")  # configuring is fine; using it is what is checked

    with pytest.raises(OutboundURLRefused, match=r"address 127\.0\.0\.1 is loopback"):
        notifier.deliver_once(APPROVAL_SLACK)
    delivery = send(notifier, APPROVAL_SLACK)
    assert (delivery.ok, delivery.attempts) == (False, 1)  # a refusal is not retried
    assert delivery.error is not None
    assert delivery.error.startswith("host 127.0.0.1 resolves to a refused address: address 127.0.0.1 is loopback")
    assert "secret" not in delivery.error
    assert hook.requests == []


def test_redirect_is_not_followed(webhook: Any) -> None:
    target = webhook()
    hook = webhook([(302, {"Location": target.url("/elsewhere")}, b"")] * 2)
    delivery = send(Notifier(slack_config(hook.url(), attempts=2)), APPROVAL_SLACK)

    assert delivery == Delivery(
        "slack", ok=False, attempts=2,
        error=f"webhook http://127.0.0.1:{hook.port}/… answered 302 redirect to {target.url('/elsewhere')};"
        " redirects are not followed",
    )
    assert len(hook.requests) == 2
    assert target.requests == []


def test_server_error_fails_with_status_and_first_200_chars(webhook: Any) -> None:
    hook = webhook([(500, {}, b"x" * 1000)])
    delivery = send(Notifier(slack_config(hook.url())), APPROVAL_SLACK, attempts=1)
    assert delivery == Delivery(
        "slack", ok=False, attempts=1,
        error=f"webhook http://127.0.0.1:{hook.port}/… answered 500 Internal Server Error: {'x' * 200}",
    )


def test_server_error_then_success_succeeds_on_attempt_two(webhook: Any) -> None:
    hook = webhook([(500, {}, b"try later"), (200, {}, b"ok")])
    delivery = send(Notifier(slack_config(hook.url())), APPROVAL_SLACK)
    assert delivery == Delivery("slack", ok=True, attempts=2, detail={"status": 200})
    assert len(hook.requests) == 2


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "file:///etc/passwd", "gopher://127.0.0.1:70/"])
def test_other_schemes_are_refused(url: str) -> None:
    scheme = url.split(":")[0]
    with pytest.raises(OutboundURLRefused, match=f"URL scheme '{scheme}' is not allowed"):
        check_url(url, allow_private=True)
    notifier = Notifier(slack_config(url))
    with pytest.raises(OutboundURLRefused):
        notifier.deliver_once(APPROVAL_SLACK)
    assert send(notifier, APPROVAL_SLACK) == Delivery(
        "slack", ok=False, attempts=1, error=f"URL scheme '{scheme}' is not allowed; use https (or http)",
        retryable=False,
    )


def test_credentials_in_url_are_refused() -> None:
    with pytest.raises(OutboundURLRefused, match="credentials in the URL"):
        check_url("https://user:pw@hooks.example.com/x")


def test_hostname_resolving_to_loopback_is_refused() -> None:
    with pytest.raises(OutboundURLRefused, match="host localhost resolves to a refused address"):
        check_url("http://localhost:9/hook")
    target = check_url("http://localhost:9/hook", allow_private=True)
    assert (target.host, target.port, target.path) == ("localhost", 9, "/hook")


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "127.0.0.1", "0.0.0.0", "224.0.0.1",
        "100.64.0.1", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
        "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe",
    ],
)
def test_address_check_refuses_non_public_addresses(address: str) -> None:
    with pytest.raises(OutboundURLRefused, match="outbound requests go to public addresses only"):
        check_address(address)
    assert check_address(address, allow_private=True) == ipaddress.ip_address(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.215.14"])
def test_address_check_allows_public_addresses(address: str) -> None:
    assert check_address(address) == ipaddress.ip_address(address)


def test_address_check_names_the_ipv4_inside_a_mapped_address() -> None:
    with pytest.raises(OutboundURLRefused, match=r"address ::ffff:7f00:1 is loopback \(127\.0\.0\.1 inside\)"):
        check_address("::ffff:127.0.0.1")


def test_address_check_rejects_what_is_not_an_address() -> None:
    with pytest.raises(OutboundURLRefused, match=r"'example\.com' is not an IP address"):
        check_address("example.com")


# --- configuration, log channel, backoff -----------------------------------------------------------


def test_unconfigured_channels_fail_at_once_saying_what_to_set() -> None:
    notifier = Notifier(NotifierConfig(smtp_host="mail.example.com"))
    assert [notifier.configured(c) for c in ("log", "email", "slack", "sms")] == [True, False, False, False]

    mail = Notice(channel="email", title="t", text="x", to=("a@example.com",))
    assert send(notifier, mail) == Delivery(
        "email", ok=False, attempts=1, error="email is not configured: set FLOWDB_SMTP_SENDER", retryable=False
    )
    assert send(Notifier.log_only(), mail).error == (
        "email is not configured: set FLOWDB_SMTP_HOST and FLOWDB_SMTP_SENDER"
    )
    slack_notice = Notice(channel="slack", title="t", text="x")
    assert send(notifier, slack_notice) == Delivery(
        "slack", ok=False, attempts=1, error="slack is not configured: set FLOWDB_SLACK_WEBHOOK_URL", retryable=False
    )
    with pytest.raises(ChannelNotConfigured, match="slack is not configured"):
        notifier.deliver_once(slack_notice)
    assert send(notifier, Notice(channel="sms", title="t", text="x")).error == (
        "unknown channel 'sms'; use one of log, email, slack"
    )


def test_log_channel_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    notice = Notice(channel="log", title="Approve invoice 17", text="first\nsecond",
                    artifacts=("a.pdf", "b.md"), approval_id=42, instance_id=7)
    with caplog.at_level(logging.INFO, logger="flowdb.notifications"):
        delivery = send(Notifier.log_only(), notice)
    assert delivery == Delivery("log", ok=True, attempts=1, detail={"logger": "flowdb.notifications"})
    [record] = caplog.records
    assert (record.name, record.levelno) == ("flowdb.notifications", logging.INFO)
    assert record.getMessage() == (
        "notice Approve invoice 17: first\\nsecond | artifacts: a.pdf, b.md | approval: 42 | instance: 7"
    )


def test_backoff_doubles_and_is_capped_at_30_seconds() -> None:
    config = NotifierConfig(backoff_seconds=1.0)
    assert [backoff_delay(config, n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_config_from_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "FLOWDB_SMTP_HOST": "mail.example.com", "FLOWDB_SMTP_PORT": "465", "FLOWDB_SMTP_SENDER": "f@example.com",
        "FLOWDB_SMTP_TLS": "ssl", "FLOWDB_SMTP_USERNAME": "flow", "FLOWDB_SMTP_PASSWORD": "s3cret-pw",
        "FLOWDB_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/x", "FLOWDB_NOTIFY_ALLOW_PRIVATE": "true",
        "FLOWDB_NOTIFY_ATTEMPTS": "5", "FLOWDB_NOTIFY_BACKOFF_SECONDS": "0.5", "FLOWDB_NOTIFY_TIMEOUT_SECONDS": "3",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert "s3cret-pw" not in repr(settings)
    notifier = Notifier.from_settings(settings)
    assert notifier.config == NotifierConfig(
        smtp_host="mail.example.com", smtp_port=465, smtp_sender="f@example.com", smtp_tls="ssl",
        smtp_username="flow", smtp_password="s3cret-pw", slack_webhook_url="https://hooks.slack.com/services/x",
        allow_private=True, attempts=5, backoff_seconds=0.5, timeout_seconds=3.0,
    )
    assert "s3cret-pw" not in repr(notifier.config)
    assert (notifier.configured("email"), notifier.configured("slack")) == (True, True)
