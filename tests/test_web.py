"""The web playground (``python -m client.web``) in a real browser against the real server.

Debian's chromium, driven headless by Playwright (never ``playwright install``:
it downloads a browser, which this machine cannot). The app runs as its own
process through the same command users type, so the test covers the CLI,
the ASGI app, the WebSocket protocol and the page together. No Triton mock:
the live test uses the session's real server, the error test a closed port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from client.web import parse_params
from client.web.app import PARAM_TYPES

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Generous: the server shares 2 cores with other work; every wait ends as soon as its condition holds.
STREAM_TIMEOUT_MS = 180_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_app(triton_url: str, log_name: str) -> Iterator[str]:
    """``python -m client.web`` on a free port; yields its base URL once /api/health answers."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = ARTIFACTS / log_name
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "client.web",
                "--triton",
                triton_url,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"web app exited with {proc.returncode}:\n{log_path.read_text()}")
                try:
                    with urllib.request.urlopen(url + "/api/health", timeout=10) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"web app did not answer within 60 s:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def browser_context(tmp_path):
    """A headless chromium with a fresh user-data-dir (no state leaks between tests)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing (scripts/setup.sh installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 640},
        )
        try:
            yield ctx
        finally:
            ctx.close()


def _record_frames(page) -> tuple[list[dict], list[dict]]:
    """Every WebSocket frame the page sends / receives, decoded (what the app was told and said)."""
    sent: list[dict] = []
    received: list[dict] = []

    def on_ws(ws) -> None:
        ws.on("framesent", lambda payload: sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: received.append(json.loads(payload)))

    page.on("websocket", on_ws)
    return sent, received


def _js_len(page, selector: str) -> int:
    return page.evaluate(f"document.querySelector({selector!r}).textContent.length")


def test_parse_params_converts_form_strings():
    assert parse_params(
        {"max_tokens": "32", "temperature": "0.5", "seed": "", "top_k": "40", "attention_mode": "cross"}
    ) == {"max_tokens": 32, "temperature": 0.5, "top_k": 40, "attention_mode": "cross"}
    assert parse_params({}) == {"max_tokens": 128}
    with pytest.raises(ValueError, match="top_k must be an integer"):
        parse_params({"top_k": "1.5"})
    with pytest.raises(ValueError, match="unknown setting"):
        parse_params({"beam_width": "2"})


@pytest.mark.server
def test_playground_live_session(triton_server, browser_context, default_model_dir):
    """Prompt -> answer and reasoning panes fill -> input mid-stream -> stop -> cancelled."""
    from playwright.sync_api import expect

    with run_app(triton_server.grpc_url, "app-live.log") as url:
        page = browser_context.new_page()
        sent, received = _record_frames(page)
        page.goto(url)
        expect(page.locator("#status")).to_have_attribute("data-ok", "true", timeout=30_000)

        page.fill("#prompt", PROMPT)
        for field, value in {
            "max_tokens": "400",
            "temperature": "0.7",
            "top_p": "0.95",
            "top_k": "40",
            "seed": "7",
            "reasoning_streams": "1",
            "reasoning_budget": "400",
        }.items():
            page.fill(f"#{field}", value)
        page.click("#start")
        expect(page.locator("body")).to_have_attribute("data-session", "running")

        # Both panes fill token by token.
        page.wait_for_function(
            "document.querySelector('#pane-output .text').textContent.trim().length > 0"
            " && document.querySelector('#pane-reasoning-0 .text').textContent.trim().length > 0",
            timeout=STREAM_TIMEOUT_MS,
        )
        first = _js_len(page, "#pane-output .text")
        page.wait_for_function(
            f"document.querySelector('#pane-output .text').textContent.length > {first}",
            timeout=STREAM_TIMEOUT_MS,
        )

        # Input while it streams: the app forwards it to session_control, the server accepts it.
        expect(page.locator("#input")).to_be_enabled()
        page.fill("#input", "Make the keeper a cat.")
        page.press("#input", "Enter")
        accepted = page.locator('#inputs li[data-state="accepted"]')
        expect(accepted).to_have_count(1, timeout=60_000)
        assert any(f.get("type") == "input" and f.get("text") == "Make the keeper a cat." for f in sent)
        acks = [f for f in received if f.get("type") == "input_ack"]
        assert acks and acks[-1]["accepted"] is True, acks
        # The server echoes the User channel: the model read every token of the pushed text.
        from backend.tokenizer import Tokenizer

        n_pushed = len(Tokenizer.from_dir(default_model_dir).encode("Make the keeper a cat."))
        expect(accepted).to_have_attribute("data-read", str(n_pushed), timeout=60_000)

        # Let the panes fill a little more (for the screenshot), then stop.
        page.wait_for_function(
            "Number(document.querySelector('#pane-output').dataset.tokens) >= 40"
            " || document.body.dataset.session !== 'running'",
            timeout=STREAM_TIMEOUT_MS,
        )
        assert page.get_attribute("body", "data-session") == "running", (
            "the session ended before stop was pressed"
        )
        page.click("#stop")
        expect(page.locator("body")).to_have_attribute("data-session", "cancelled", timeout=60_000)
        expect(page.locator("#pane-output")).to_have_attribute("data-state", "cancelled")
        expect(page.locator("#start")).to_be_enabled()
        expect(page.locator("#error")).to_be_hidden()

        assert {"type": "stop"} in sent
        stop_acks = [f for f in received if f.get("type") == "stop_ack"]
        assert stop_acks and stop_acks[0]["via"] == "server" and stop_acks[0]["accepted"] is True, stop_acks
        done = [f for f in received if f.get("type") == "done"]
        assert len(done) == 1 and done[0]["outcome"] == "cancelled", done
        assert done[0]["finish_reasons"]["output"] == "cancelled"

        # Per-stream numbers are on the page.
        for pane in ("#pane-output", "#pane-reasoning-0"):
            expect(page.locator(f"{pane} .ttft")).to_contain_text(re.compile(r"TTFT \d+ ms"))
            expect(page.locator(f"{pane} .rate")).to_contain_text(re.compile(r"\d+\.\d tok/s"))
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_playground_reports_triton_down(browser_context):
    """Pointed at a closed port, the page says so at load and when a prompt is sent."""
    from playwright.sync_api import expect

    closed = f"127.0.0.1:{_free_port()}"  # bound then released: nothing listens there
    with run_app(closed, "app-down.log") as url:
        with urllib.request.urlopen(url + "/api/health", timeout=30) as r:
            health = json.load(r)
        assert health["ok"] is False and closed in health["message"]
        with urllib.request.urlopen(url + "/api/params", timeout=30) as r:
            table = json.load(r)
        assert [row["name"] for row in table] == list(PARAM_TYPES)

        page = browser_context.new_page()
        page.goto(url)
        expect(page.locator("#status")).to_have_attribute("data-ok", "false", timeout=30_000)
        # The settings form is built from that table: one field per option, by name.
        expect(page.locator("#params label")).to_have_count(len(table))
        assert page.locator("#attention_mode option").all_inner_texts() == ["default", "isolated", "cross"]
        error = page.locator("#error")
        expect(error).to_be_visible()
        expect(error).to_contain_text(f"cannot reach Triton at {closed}")

        page.click("#start")
        expect(page.locator("body")).to_have_attribute("data-outcome", "error", timeout=60_000)
        expect(error).to_contain_text("Triton is down or unreachable")
        expect(error).to_contain_text(closed)
        expect(page.locator("#start")).to_be_enabled()
        page.screenshot(path=str(ARTIFACTS / "triton-down.png"))
