"""The persona chat page at `GET /`, driven in Debian's chromium by Playwright against the real
server: key entry, persona switching mid-conversation, streaming, Stop, errors, and an upload."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from server.lora.registry import adapter_version
from server.training.styles import STYLES, marker_count
from tests.e2e.server_proc import ADMIN_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FILES = ("adapter_config.json", "adapter_model.safetensors")
# the personas the repo ships (adapters/), so a switch must show up as a change of voice
SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
PERSONA_A, PERSONA_B, PERSONA_C = "pirate", "robot", "shakespeare"
WAIT_MS = 240_000  # a slow, shared CPU: generous, but every wait is on a DOM state, never a sleep
# expect()'s own default is 5 s, apart from the page's: a first token later than that on a loaded
# CPU failed a test, and the reply it never stopped then blocked the next one
expect.set_options(timeout=WAIT_MS)

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is missing (`make test` installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    imports = tmp_path_factory.mktemp("imports")
    for name in (PERSONA_A, PERSONA_B):
        imports.joinpath(name).mkdir()
        for file in FILES:
            shutil.copy(SHIPPED / name / file, imports / name / file)
    with ServerProc(
        tmp_path_factory.mktemp("store"),
        # an alias of the base (vLLM's several served names) is no persona of its own
        args=["--import-adapters", str(imports), "--served-model-name", BASE_ID, "smol-alias"],
        env={"LORAPLEX_ADMIN_KEYS": ADMIN_KEY},
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def page(server: ServerProc) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 820})
            pg = context.new_page()
            pg.set_default_timeout(WAIT_MS)
            pg.goto(server.url + "/")
            yield pg
        finally:
            browser.close()


def shot(page: Page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"chat-page-{name}.png"))


def assistant(page: Page) -> Locator:
    return page.locator('[data-testid="assistant-message"]')


def send(page: Page, text: str) -> Locator:
    """Send a message; returns the new assistant bubble."""
    before = assistant(page).count()
    page.fill("#prompt", text)
    page.click("#send")
    expect(assistant(page)).to_have_count(before + 1)
    return assistant(page).nth(before)


def finished(bubble: Locator) -> str:
    expect(bubble).to_have_attribute("data-state", "done")
    text = bubble.locator('[data-testid="message-text"]').inner_text().strip()
    assert text and text != "(empty reply)"
    return text


def test_page_and_static_files_are_served_without_auth(server: ServerProc) -> None:
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    assert 'id="persona"' in r.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        s = httpx.get(server.url + path, timeout=30)
        assert s.status_code == 200, path
        assert kind in s.headers["content-type"]
        assert s.headers["cache-control"] == "no-cache"
    assert httpx.get(server.url + "/static/nope.js", timeout=30).status_code == 404
    # the API behind it stays closed
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401


def test_wrong_key_is_shown_plainly(page: Page, artifacts_dir: Path) -> None:
    status = page.locator('[data-testid="models-status"]')
    expect(status).to_contain_text("Enter an API key")
    expect(page.locator("#upload-submit")).to_be_disabled()
    page.fill("#api-key", "not-the-key")
    expect(status).to_contain_text("Incorrect API key provided")
    shot(page, artifacts_dir, "01-wrong-key")


def test_chat_switching_personas_keeps_the_history(page: Page, artifacts_dir: Path) -> None:
    page.fill("#api-key", ADMIN_KEY)
    picker = page.locator("#persona")
    expect(picker).to_have_attribute("data-state", "ready")
    options = picker.locator("option")
    expect(options).to_have_count(3)
    assert options.nth(0).get_attribute("value") == BASE_ID
    expect(options.nth(0)).to_have_text("Base model")
    assert sorted(options.nth(i).get_attribute("value") or "" for i in (1, 2)) == [PERSONA_A, PERSONA_B]
    expect(page.locator("#persona-hint")).to_have_text("2 personas available.")
    expect(page.locator("#upload-submit")).to_be_enabled()
    # a key survives a reload (localStorage)
    page.reload()
    expect(page.locator("#api-key")).to_have_value(ADMIN_KEY)
    expect(picker).to_have_attribute("data-state", "ready")

    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    picker.select_option(PERSONA_A)
    shot(page, artifacts_dir, "02-ready")

    first = send(page, "What is the capital of France?")
    expect(first.locator('[data-testid="persona-label"]')).to_have_text(PERSONA_A)
    text_a = finished(first)
    shot(page, artifacts_dir, "03-persona-a")

    picker.select_option(PERSONA_B)
    expect(page.locator('[data-testid="persona-switch"]')).to_contain_text(PERSONA_B)
    second = send(page, "And what is it famous for?")
    text_b = finished(second)
    expect(second.locator('[data-testid="persona-label"]')).to_have_text(PERSONA_B)
    assert second.get_attribute("data-persona") == PERSONA_B
    assert text_b != text_a
    # each reply is in its persona's voice, not in the other one's
    pirate, robot = STYLES[PERSONA_A], STYLES[PERSONA_B]
    assert marker_count(text_a, pirate) >= 2 and marker_count(text_a, robot) < marker_count(text_a, pirate), (
        text_a
    )
    # the pirate reply is in the robot's context; the robot must still answer as the robot
    assert marker_count(text_b, robot) >= 2 and marker_count(text_b, pirate) < marker_count(text_b, robot), (
        text_b
    )

    # the first exchange is still there, still labelled with persona A
    users = page.locator('[data-testid="user-message"]')
    expect(users).to_have_count(2)
    expect(users.nth(0)).to_have_text("What is the capital of France?")
    expect(assistant(page)).to_have_count(2)
    expect(first.locator('[data-testid="persona-label"]')).to_have_text(PERSONA_A)
    assert first.locator('[data-testid="message-text"]').inner_text().strip() == text_a
    expect(page.locator('[data-testid="error"]')).to_be_hidden()
    shot(page, artifacts_dir, "04-persona-b")


def aborted_requests(url: str, adapter: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in metrics.splitlines():
        if (
            line.startswith("loraplex:requests_total{")
            and f'adapter="{adapter}"' in line
            and 'outcome="aborted"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def running(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_stop_aborts_a_long_reply(page: Page, server: ServerProc, artifacts_dir: Path) -> None:
    page.fill("#max-tokens", "600")
    before = aborted_requests(server.url, PERSONA_B)
    bubble = send(page, "Tell me a very long story about a ship at sea.")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    expect(bubble).to_have_attribute("data-state", "streaming")
    expect(bubble.locator('[data-testid="message-text"]')).to_have_text(re.compile(r"\S"))
    page.click("#stop")
    expect(bubble).to_have_attribute("data-state", "stopped")
    expect(bubble.locator('[data-testid="message-status"]')).to_have_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    shot(page, artifacts_dir, "05-stopped")
    # the server saw the disconnect and aborted the engine request (600 tokens would take minutes)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if aborted_requests(server.url, PERSONA_B) > before and running(server.url) == 0:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the server did not abort the stopped request")


def test_upload_selects_the_new_persona(page: Page, server: ServerProc, artifacts_dir: Path) -> None:
    page.fill("#max-tokens", "24")
    source = SHIPPED / PERSONA_C
    page.fill("#upload-name", PERSONA_C)
    page.set_input_files("#upload-config", str(source / FILES[0]))
    page.set_input_files("#upload-weights", str(source / FILES[1]))
    page.click("#upload-submit")
    status = page.locator('[data-testid="upload-status"]')
    expect(status).to_have_attribute("data-state", "done")
    expect(status).to_contain_text(f"Uploaded {PERSONA_C}")
    expect(page.locator("#persona")).to_have_value(PERSONA_C)
    expect(page.locator("#persona option")).to_have_count(4)
    shot(page, artifacts_dir, "06-uploaded")

    # the server holds what the form sent, byte for byte
    r = httpx.get(f"{server.url}/v1/adapters/{PERSONA_C}", headers=headers(ADMIN_KEY), timeout=30)
    assert r.status_code == 200
    assert r.json()["version"] == adapter_version(source)

    bubble = send(page, "Say hello in one sentence.")
    expect(bubble.locator('[data-testid="persona-label"]')).to_have_text(PERSONA_C)
    text_c = finished(bubble)
    assert marker_count(text_c, STYLES[PERSONA_C]) >= 2, text_c
    shot(page, artifacts_dir, "07-persona-c")

    # a refused upload shows the server's error envelope plainly
    page.fill("#upload-name", "bad name!")
    page.set_input_files("#upload-config", str(source / FILES[0]))
    page.set_input_files("#upload-weights", str(source / FILES[1]))
    page.click("#upload-submit")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text("Upload refused")
    expect(status).to_contain_text("HTTP 400")
    shot(page, artifacts_dir, "08-upload-refused")


def test_mobile_layout(page: Page, artifacts_dir: Path) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#settings")).to_be_hidden()
    shot(page, artifacts_dir, "09-mobile")
    page.click("#toggle-settings")
    expect(page.locator("#settings")).to_be_visible()
    shot(page, artifacts_dir, "10-mobile-settings")
    page.click("#toggle-settings")
    page.set_viewport_size({"width": 1280, "height": 820})
