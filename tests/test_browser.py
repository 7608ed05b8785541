"""The Annotate tab in a real browser: Playwright driving Debian's Chromium, headless.

    .venv/bin/python -m pytest tests/test_browser.py
"""

import re
import sqlite3

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def login(browser, app, user: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app.url)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", app.users[user])
    page.keyboard.press("Enter")
    return page


def shown_pair(page) -> tuple[str, str]:
    page.wait_for_selector("#vote-a:not([disabled])", timeout=120_000)
    md = " .pl-text"  # the rendered answer, without Gradio's progress overlay
    return page.inner_text("#answer-a" + md).strip(), page.inner_text("#answer-b" + md).strip()


def leading_words(text: str, n: int = 3) -> list[str]:
    """The first words of an answer as a reader sees them, from its Markdown source or its rendered
    text alike: code fences, list numbers and Markdown marks left out."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("```")]
    words = [w.strip("#*_>`-|") for w in " ".join(lines).split()]
    return [w for w in words if w and not re.fullmatch(r"\d+[.)]", w)][:n]


def test_vote_by_click_and_by_keyboard_stores_the_displayed_order(browser, app, tmp_path):
    page = login(browser, app, "alice")
    first = shown_pair(page)
    guide = page.locator("#guidelines")
    assert "Guidelines" in guide.inner_text()
    if not page.locator("#guidelines-text").is_visible():  # folded once alice has voted under them
        guide.get_by_text("Guidelines").first.click()
    page.wait_for_selector("#guidelines-text strong:has-text('fewer words')", timeout=10_000)  # rendered
    page.locator("#reason").locator("textarea, input").first.fill("more to the point")
    page.click("#vote-a")
    page.wait_for_selector("#status:has-text('recorded')", timeout=60_000)
    second = shown_pair(page)  # the next pair loads by itself
    assert second != first
    page.keyboard.press("b")
    page.wait_for_function(
        "document.querySelector('#status').innerText.match(/Vote #\\d+ recorded/g)", timeout=60_000)
    page.wait_for_selector("#vote-a:not([disabled])", timeout=120_000)
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        rows = conn.execute(
            "SELECT v.choice, p.answer_left, p.answer_right, p.finish_left, p.finish_right FROM votes v "
            "JOIN pairs p ON p.id = v.pair_id WHERE v.annotator = 'alice' ORDER BY v.id DESC LIMIT 2").fetchall()
    (kchoice, kleft, kright, *_), (cchoice, cleft, cright, *cfinish) = rows
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        reasons = [r[0] for r in conn.execute(
            "SELECT reason FROM votes WHERE annotator = 'alice' ORDER BY id DESC LIMIT 2")]
    assert reasons == [None, "more to the point"]  # typed before the click; the key vote had none
    assert (cchoice, kchoice) == ("left", "right")
    # What the browser showed as A/B is what was stored as left/right (rendered text vs markdown source).
    assert leading_words(first[0]) == leading_words(cleft) and leading_words(first[1]) == leading_words(cright)
    assert leading_words(second[0]) == leading_words(kleft) and leading_words(second[1]) == leading_words(kright)
    # An answer that stopped at the token limit says so under it (48 tokens here: most do); a
    # finished one does not.
    assert ["cut at the length limit" in shown for shown in first] == [f == "length" for f in cfinish]
    # Second thoughts: U shows the pair voted last again; another key replaces that vote.
    page.keyboard.press("u")
    page.wait_for_selector("#status:has-text('You said')", timeout=60_000)
    assert shown_pair(page) == second
    page.keyboard.press("a")
    page.wait_for_function(
        "document.querySelector('#status').innerText.match(/Vote #\\d+ recorded/g)", timeout=60_000)
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        history = conn.execute(
            "SELECT v.choice, v.superseded_by IS NULL, p.id FROM votes v JOIN pairs p ON p.id = v.pair_id "
            "WHERE p.answer_left = ? AND v.annotator = 'alice' ORDER BY v.id", (kleft,)).fetchall()
    assert [h[:2] for h in history] == [("right", 0), ("left", 1)]  # both kept; the new one counts
    page.close()
    # ...and the changed vote is the one that trains and is exported (storage.pairs decides both).
    from datasets import load_dataset

    from storage.export import export_all
    from storage.votes import VoteStore

    export_all(VoteStore(app.data_dir / "votes.db"), tmp_path / "export", salt="s")
    prefs = load_dataset(str(tmp_path / "export"), "preferences", cache_dir=str(tmp_path / "cache"))
    rows = [r for split in prefs.values() for r in split if r["pair_id"] == history[0][2]]
    assert [(r["choice"], r["chosen"][0]["content"]) for r in rows] == [("left", kleft)]


def test_admin_tab_is_shown_to_admins_only(browser, app):
    admin = login(browser, app, "alice")
    admin.wait_for_selector("button[role=tab]:has-text('Admin')", timeout=60_000)
    user = login(browser, app, "bob")
    user.wait_for_selector("#vote-a", timeout=60_000)
    assert user.locator("button[role=tab]:has-text('Admin')").count() == 0
    admin.close()
    user.close()


def test_admin_starts_a_round_and_watches_it_to_the_end_with_plots(browser, app, tmp_path):
    from storage.votes import VoteStore
    from tests.test_rounds import _seed_votes

    _seed_votes(VoteStore(app.data_dir / "votes.db"), 8)  # the app's own database, as more annotators would
    page = login(browser, app, "alice")
    page.click("button[role=tab]:has-text('Admin')")
    page.wait_for_selector("#admin-summary:has-text('Votes:')", timeout=60_000)
    page.click("#run-round")
    page.wait_for_selector("#round-progress:has-text('step')", timeout=120_000)  # live progress
    page.wait_for_selector("#round-progress:has-text('Last round')", timeout=300_000)
    progress = page.inner_text("#round-progress [data-testid=markdown]")
    assert "promoted" in progress, progress
    page.wait_for_selector("#rounds-table:has-text('promoted')", timeout=30_000)
    for plot in ("#plot-loss", "#plot-accuracy", "#plot-votes", "#plot-rounds"):
        page.wait_for_selector(f"{plot} canvas, {plot} svg", timeout=30_000)  # drawn, not "no data"
    page.set_viewport_size({"width": 1280, "height": 2200})
    page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
    page.close()


def test_a_follow_up_shows_the_conversation_and_asks_it_whole(browser, app):
    import json
    import re

    page = login(browser, app, "bob")
    shown_pair(page)
    page.click("#vote-a")
    page.wait_for_selector("#status:has-text('recorded')", timeout=60_000)
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        voted, messages, chosen = conn.execute(
            "SELECT p.id, p.messages, p.answer_left FROM votes v JOIN pairs p ON p.id = v.pair_id "
            "WHERE v.annotator = 'bob' ORDER BY v.id DESC LIMIT 1").fetchone()
    page.get_by_text("Follow up on the answer you chose").click()
    page.locator("#follow-up").locator("textarea").fill("Say that again, shorter.")
    page.click("#follow-up-go")
    page.wait_for_function("document.querySelectorAll('#prompt .pl-turn').length === 2", timeout=120_000)
    shown_pair(page)
    turns = page.locator("#prompt .pl-turn").all_inner_texts()
    assert turns[0].startswith("User:") and turns[1].startswith("Assistant:")
    assert all(w in turns[1] for w in re.findall(r"[A-Za-z]{4,}", chosen)[:3])  # rendered: compare words
    assert "Say that again, shorter." in page.inner_text("#prompt")
    with sqlite3.connect(app.data_dir / "votes.db") as conn:
        latest = json.loads(conn.execute(
            "SELECT messages FROM pairs WHERE annotator = 'bob' ORDER BY created_at DESC LIMIT 1").fetchone()[0])
    assert latest == [*json.loads(messages), {"role": "assistant", "content": chosen.strip()},
                      {"role": "user", "content": "Say that again, shorter."}]
    assert voted
    page.close()
