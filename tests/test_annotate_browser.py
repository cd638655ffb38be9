"""``posttrain annotate serve`` in a real browser: three people label through the page, the export matches.

The server runs as the CLI runs it (a subprocess on a free loopback port); annotators are added with
``posttrain annotate add-annotator``; headless Chromium (Debian's ``chromium`` and
``chromium-driver``, never downloaded) labels by keyboard, by mouse, and by both with skips,
strengths and comments. Two responses carry markup that would set ``window.__pwned`` if it ran.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import annotate_server

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ADMIN = "browser-test-admin-token"
SCRIPT = "<script>window.__pwned = 1</script>"
IMAGE = '<img src=x onerror="window.__pwned=1">'
PAIRS = [
    {"id": "s1", "prompt": "Greet me <b>politely</b>", "response_a": f"Hello!\n{SCRIPT}", "response_b": "hi"},
    {"id": "s2", "prompt": "Describe the picture", "response_a": f"It shows {IMAGE}", "response_b": "A cat on a mat."},
    {"id": "p3", "prompt": "What is 2 + 2?", "response_a": "4", "response_b": "5"},
    {"id": "p4", "prompt": "Name a colour\nin one word", "response_a": "Blue", "response_b": "Sky"},
    {"id": "k1", "prompt": "Is water wet?", "response_a": "Yes.", "response_b": "Purple.", "gold": "a"},
]
OTHER = {"a": "b", "b": "a"}


def posttrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def served(tmp_path):
    """(base url, pairs file, db) of a running ``posttrain annotate serve``; stopped by its pid afterwards."""
    pairs, db = tmp_path / "pairs.jsonl", tmp_path / "labels.sqlite"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    with annotate_server(pairs, db, ADMIN, "--overlap", "3", "--gold-rate", "0.3") as url:
        yield url, pairs, db


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: install Debian's `chromium chromium-driver` (CI does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))  # no Selenium Manager download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# An annotator's plan: page number -> list of steps, each ("key", key), ("click", element id) or
# ("type", text into the comment box). What the page then records follows from the steps.
def keyboard_plan(page: int) -> list[tuple[str, str]]:
    from selenium.webdriver.common.keys import Keys

    keys = ["1", Keys.ARROW_RIGHT, "3", "x", Keys.ARROW_LEFT, "2", "t", "4"]
    return [("key", keys[page % len(keys)])]


def mouse_plan(page: int) -> list[tuple[str, str]]:
    buttons = ["choice-left", "choice-right", "choice-both_bad", "choice-tie", "choice-left", "choice-right"]
    return [("click", buttons[page % len(buttons)])]


def mixed_plan(page: int) -> list[tuple[str, str]]:
    from selenium.webdriver.common.keys import Keys

    plans = [
        [("key", "s")],  # skip
        # shortcut letters typed into the comment must stay text; Esc leaves the box, then a key labels
        [("click", "strength-3"), ("type", "1 t x s <i>clearer</i> & shorter"), ("key", Keys.ESCAPE), ("key", "2")],
        [("click", "strength-2"), ("click", "choice-tie")],  # a strength with a tie is dropped
        [("click", "strength-1"), ("click", "choice-left")],
    ]
    return plans[page] if page < len(plans) else [("key", "x")]


def expected_label(steps: list[tuple[str, str]], left: str) -> dict | None:
    """What a page's steps record (choice in a/b terms, strength, comment, where chosen was), None for a skip."""
    from selenium.webdriver.common.keys import Keys

    actions = {"1": "left", Keys.ARROW_LEFT: "left", "2": "right", Keys.ARROW_RIGHT: "right", "3": "tie", "t": "tie",
               "4": "both_bad", "x": "both_bad", "s": "skip"}  # fmt: skip
    strength, comment, action = None, "", None
    for kind, value in steps:
        if kind == "type":
            comment = value
        elif kind == "click" and value.startswith("strength-"):
            strength = int(value.removeprefix("strength-"))
        elif kind == "click":
            action = value.removeprefix("choice-")
        elif value in actions:
            action = actions[value]
    if action == "skip":
        return None
    choice = {"left": left, "right": OTHER[left]}.get(action, action)
    if choice in ("tie", "both_bad"):
        return {"choice": choice, "strength": None, "comment": comment, "position": None}
    return {
        "choice": choice,
        "strength": strength,
        "comment": comment,
        "position": "left" if choice == left else "right",
    }


def render_ms(driver) -> float:
    """Navigation start to the end of the load event, in milliseconds (Navigation Timing)."""
    from selenium.webdriver.support.ui import WebDriverWait

    timing = "performance.timing"
    script = f"return {timing}.loadEventEnd > 0 ? {timing}.loadEventEnd - {timing}.navigationStart : null"
    return float(WebDriverWait(driver, 30).until(lambda d: d.execute_script(script)))


def label_all(driver, link: str, plan, seen: dict) -> tuple[dict, list[float], int]:
    """Follow ``plan`` page after page until the done page: ({pair id: expected label or None}, render
    times, the count the done page shows). ``seen`` collects the literal markup the page displayed."""
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(link)
    done, times = {}, []
    for page in range(20):
        times.append(render_ms(driver))
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        if driver.find_elements(By.ID, "done"):
            return done, times, int(driver.find_element(By.ID, "done-count").text)
        main = driver.find_element(By.ID, "task")
        pair_id, left = main.get_attribute("data-pair-id"), main.get_attribute("data-left")
        shown = driver.find_element(By.ID, "answer-left").text + "\n" + driver.find_element(By.ID, "answer-right").text
        seen.update({markup: pair_id for markup in (SCRIPT, IMAGE) if markup in shown})
        steps = plan(page)
        for kind, value in steps:
            if kind == "key":
                ActionChains(driver).send_keys(value).perform()
            elif kind == "click":
                driver.find_element(By.ID, value).click()
            else:
                driver.find_element(By.ID, "comment").send_keys(value)
        done[pair_id] = expected_label(steps, left)
        WebDriverWait(driver, 30).until(expected_conditions.staleness_of(main))
    raise AssertionError("the done page never came")


def test_three_annotators_label_in_chromium_and_the_export_matches(served, browser, tmp_path):
    url, _, db = served
    links = {}
    for name in ("kim", "moe", "max"):
        added = posttrain("annotate", "add-annotator", name, "--db", str(db), "--url", url)
        assert added.returncode == 0, added.stderr
        links[name] = added.stdout.strip()
        assert links[name].startswith(f"{url}/a/")
    plans = {"kim": keyboard_plan, "moe": mouse_plan, "max": mixed_plan}
    expected, times, seen = {}, [], {}
    for name, plan in plans.items():
        done, own_times, shown_count = label_all(browser, links[name], plan, seen)
        labelled = {pair_id: row for pair_id, row in done.items() if row is not None}
        assert shown_count == len(labelled)
        assert {"s1", "s2", "p3", "p4"} <= set(done)  # every regular pair, labelled or skipped
        expected.update({(name, pair_id): row for pair_id, row in labelled.items()})
        times += own_times
    assert set(seen) == {SCRIPT, IMAGE}  # shown literally, as text
    assert any(row is not None and row["comment"] for row in expected.values())
    print(f"\nannotator page rendered (navigationStart to loadEventEnd): median {statistics.median(times):.0f} ms, "
          f"max {max(times):.0f} ms over {len(times)} pages")  # fmt: skip

    output = tmp_path / "all.jsonl"
    exported = posttrain("annotate", "export", "--db", str(db), "--output", str(output), "--aggregate", "all",
                         "--keep-ties")  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    texts = {row["id"]: row for row in PAIRS}
    found = {}
    for row in rows:
        pair = texts[row["pair_id"]]
        decided = row["choice"] in ("a", "b")
        if decided:
            assert (row["chosen"], row["rejected"]) == (pair[f"response_{row['choice']}"],
                                                        pair[f"response_{OTHER[row['choice']]}"])  # fmt: skip
        found[(row["annotator_id"], row["pair_id"])] = {"choice": row["choice"], "strength": row["strength"],
                                                        "comment": row["comment"],
                                                        "position": row["position"] if decided else None}  # fmt: skip
    assert len(rows) == len(found) == len(expected)
    assert found == expected


def test_serve_on_a_port_in_use_is_one_line_and_writes_nothing(served, tmp_path):
    url, pairs, _ = served
    port = url.rsplit(":", 1)[1]
    other = tmp_path / "other.sqlite"
    refused = posttrain("annotate", "serve", "--pairs", str(pairs), "--db", str(other), "--port", port)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"posttrain annotate: error: --port {port}: address 127.0.0.1:{port} is in use"
    ]
    assert not other.exists()
