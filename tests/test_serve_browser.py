"""The search page in real headless Chromium (Debian's /usr/bin/chromium, driven by playwright; no browser
is ever downloaded): type a query, results appear, an animated preview loads, a bad filter shows its error.
The service needs a bearer token (``--auth-token-file``): the page is opened as ``/#token=...`` and sends it
with every API call, previews included; opened without it, the page says how to give it."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright import sync_api  # the dev extra; drives Debian's chromium, never downloads one

# same tiny index and captions as the API tests (tests/ is on sys.path)
from test_serve import make_service_index, write_generated_captions

from workflows.serve import build_app, serving_in_thread
from workflows.serve.access import access_for

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token-5d1c0e"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page_url(ingested_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-browser")
    index, ckpt, ids = make_service_index(tmp, ingested_shards)
    captions = write_generated_captions(tmp / "captions", ids)
    (tmp / "token").write_text(TOKEN)
    app = build_app(str(index), pretrained=str(ckpt), shards=[str(ingested_shards)], poll_s=0,
                    cache_dir=str(tmp / "previews"), captions=[str(captions)],
                    access=access_for("127.0.0.1", token_file=str(tmp / "token")))
    with serving_in_thread(app) as base:
        yield base + "/"


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium (make browser)"
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_query_shows_results_with_animated_previews(page_url, browser):
    page = browser.new_page()
    external = []
    local = (page_url, "blob:" + page_url)  # blob: URLs are the previews the page fetched with the token
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(local) else None)
    page.goto(page_url + "#token=" + TOKEN)
    assert TOKEN not in page.url  # the page keeps the token for the tab, not in the address bar
    page.wait_for_function("document.getElementById('version').textContent.includes('videos')")
    page.fill("#q", "a red circle moves left")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .hit", timeout=30_000)
    cards = page.locator("#results .hit")
    assert cards.count() == 20
    assert "score" in cards.first.inner_text() and " s" in cards.first.inner_text()
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].some(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000)
    widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
    assert max(widths) > 0
    assert "videos for" in page.inner_text("#status")
    generated = page.locator("#results .generated:not([hidden])")  # every other video has one
    assert generated.count() > 0 and all(t.startswith("generated: generated for synth-")
                                         for t in generated.all_inner_texts())
    no_preview = page.locator("#results .none")  # the 3 videos outside every shard say so
    assert no_preview.count() in (0, 1, 2, 3) and all(
        "cannot reach" in t for t in no_preview.all_inner_texts())
    assert external == []  # everything the page loads comes from the service (no CDN)
    page.close()


def test_bad_filter_shows_the_services_message(page_url, browser):
    page = browser.new_page()
    page.goto(page_url + "#token=" + TOKEN)
    page.fill("#q", "a blue square")
    page.click("#filters summary")
    page.fill("#where", "colour:red")
    page.press("#q", "Enter")
    page.wait_for_selector("#status.error")
    assert "unknown filter column 'colour'" in page.inner_text("#status")
    page.close()


def test_without_the_token_the_page_says_how_to_give_it(page_url, browser):
    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_function("document.getElementById('version').textContent.includes('not reachable')")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    page.wait_for_selector("#status.error")
    status = page.inner_text("#status")
    assert "Authorization: Bearer" in status and "/#token=TOKEN" in status
    page.close()
