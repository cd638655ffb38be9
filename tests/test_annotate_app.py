"""The web app of ``posttrain annotate serve`` through FastAPI's TestClient: pages, labels, tokens, escaping."""

from __future__ import annotations

import argparse
import json
import re
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from posttrain.annotate import server
from posttrain.annotate.app import create_app
from posttrain.annotate.store import Store
from posttrain.errors import UserError

ADMIN = "admin-token-for-the-tests"
SCRIPT = "<script>alert('pwned')</script>"
IMAGE = '<img src=x onerror="alert(1)">'


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def plain_rows(n: int) -> list[dict]:
    """n pairs without gold, then one with gold "a"; plain words only, so texts appear verbatim in HTML."""
    rows = [{"id": f"p{i}", "prompt": f"question {i}", "response_a": f"answer {i} alpha",
             "response_b": f"answer {i} bravo"} for i in range(n)]  # fmt: skip
    return [*rows, {"id": "g0", "prompt": "known", "response_a": "right one", "response_b": "wrong one", "gold": "a"}]


@pytest.fixture
def setup(tmp_path):
    """(client, store, {name: token}) over 6 plain pairs and one check, overlap 2, three annotators."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", plain_rows(6))
    store = Store.create_or_open(tmp_path / "labels.sqlite", pairs, 2, 0.0, 0, "pairs.jsonl")
    tokens = {name: store.add_annotator(name) for name in ("alice", "bob", "carol")}
    yield TestClient(app_of(store)), store, tokens
    store.close()


def app_of(store: Store):
    return create_app(store, ADMIN, pay_per_label=0.25, currency="EUR")


def page_fields(page: str) -> dict[str, str]:
    """The data attributes of the labelling page's <main>."""
    main = re.search(r'<main id="task" data-assignment="(\d+)" data-pair-id="([^"]*)" data-left="([ab])">', page)
    assert main, page
    return {"assignment": main.group(1), "pair_id": main.group(2), "left": main.group(3)}


def assignment_with_left_b(client: TestClient, store: Store, tokens: dict[str, str]) -> tuple[str, dict]:
    """(annotator, page fields) of a page that shows response_b on the left; skips pairs until one does."""
    for name, token in tokens.items():
        for _ in range(6):
            fields = page_fields(client.get(f"/a/{token}").text)
            if fields["left"] == "b":
                return name, fields
            client.post(f"/a/{token}/skip", data={"assignment": fields["assignment"]})
    raise AssertionError("no assignment with response_b on the left")


def test_page_shows_the_answers_in_the_stored_order(setup):
    client, store, tokens = setup
    for name, token in tokens.items():
        response = client.get(f"/a/{token}")
        assert response.status_code == 200
        fields = page_fields(response.text)
        assignment = store.next_assignment(name)  # the open one: the same pair, the same side
        assert (str(assignment.id), assignment.pair.id, assignment.left) == tuple(fields.values())
        left = assignment.pair.response_a if assignment.left == "a" else assignment.pair.response_b
        right = assignment.pair.response_b if assignment.left == "a" else assignment.pair.response_a
        page = response.text
        assert page.index(f'id="answer-left">{left}<') < page.index(f'id="answer-right">{right}<')
        assert f'id="prompt">{assignment.pair.prompt}<' in page
        for button in ("A is better", "B is better", "Tie", "Both bad", "Skip"):
            assert button in page
    assert "0 done · 6 remaining" in client.get(f"/a/{tokens['alice']}").text


def test_csp_allows_only_the_pages_own_script(setup):
    client, _, tokens = setup
    response = client.get(f"/a/{tokens['alice']}")
    policy = response.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert re.findall(r"<script[^>]*>", response.text) == [f'<script nonce="{nonce}">']
    assert response.headers["referrer-policy"] == "no-referrer"
    assert nonce not in client.get(f"/a/{tokens['alice']}").headers["content-security-policy"]  # fresh per page


def test_form_label_is_stored_in_a_b_terms(setup):
    client, store, tokens = setup
    name, fields = assignment_with_left_b(client, store, tokens)
    form = {"assignment": fields["assignment"], "choice": "left", "strength": "2", "comment": "  clearer <b>  "}
    response = client.post(f"/a/{tokens[name]}/label", data=form, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/a/{tokens[name]}"
    label = store.labels()[-1]
    assert (label.pair_id, label.annotator, label.choice, label.left) == (fields["pair_id"], name, "b", "b")
    assert (label.strength, label.comment) == (2, "clearer <b>")
    # a tie drops the strength radio that stays set on the page
    next_fields = page_fields(client.get(f"/a/{tokens[name]}").text)
    form = {"assignment": next_fields["assignment"], "choice": "tie", "strength": "3", "comment": ""}
    client.post(f"/a/{tokens[name]}/label", data=form)
    assert (store.labels()[-1].choice, store.labels()[-1].strength) == ("tie", None)


def test_json_label_is_stored_once_in_a_b_terms(setup):
    client, store, tokens = setup
    name, fields = assignment_with_left_b(client, store, tokens)
    shown = client.get(f"/api/a/{tokens[name]}/next").json()
    pair = {p.id: p for p in store.pairs()}[fields["pair_id"]]
    assert shown["assignment"] == int(fields["assignment"]) and shown["is_check"] is False
    assert (shown["prompt"], shown["left"], shown["right"]) == (pair.prompt, pair.response_b, pair.response_a)
    body = {"assignment": shown["assignment"], "choice": "right", "strength": 3, "comment": "sure"}
    assert client.post(f"/api/a/{tokens[name]}/label", json=body).json() == {"recorded": True}
    assert client.post(f"/api/a/{tokens[name]}/label", json=body).json() == {"recorded": False}
    labels = store.labels()
    assert len(labels) == 1
    assert (labels[0].pair_id, labels[0].choice, labels[0].strength, labels[0].comment) == (pair.id, "a", 3, "sure")


def test_bad_labels_are_refused_and_nothing_is_stored(setup):
    client, store, tokens = setup
    token = tokens["alice"]
    assignment = client.get(f"/api/a/{token}/next").json()["assignment"]
    bad_forms = [{"assignment": assignment, "choice": "up"}, {"assignment": "x1", "choice": "left"},
                 {"assignment": assignment, "choice": "left", "strength": "9"}]  # fmt: skip
    for form in bad_forms:
        assert client.post(f"/a/{token}/label", data=form).status_code == 400
    bad_bodies = [b"{not json", b"[1]", json.dumps({"assignment": assignment, "choice": "tie", "strength": 2}).encode(),
                  json.dumps({"assignment": True, "choice": "left"}).encode(),
                  json.dumps({"assignment": assignment, "choice": "left", "strength": 1.0}).encode()]  # fmt: skip
    for body in bad_bodies:
        assert client.post(f"/api/a/{token}/label", content=body).status_code == 400
    assert store.labels() == []


def test_skip_serves_another_pair_and_a_skipped_pair_cannot_be_labelled(setup):
    client, store, tokens = setup
    token = tokens["bob"]
    first = page_fields(client.get(f"/a/{token}").text)
    assert client.post(f"/a/{token}/skip", data={"assignment": first["assignment"]}).status_code == 200
    second = page_fields(client.get(f"/a/{token}").text)
    assert second["pair_id"] != first["pair_id"]
    assert store.progress("bob").skipped == 1
    body = {"assignment": int(first["assignment"]), "choice": "left"}
    assert client.post(f"/api/a/{token}/label", json=body).status_code == 409
    assert store.labels() == []


def test_wrong_tokens_and_other_peoples_assignments_get_403_and_no_data(setup):
    client, store, tokens = setup
    alice = client.get(f"/api/a/{tokens['alice']}/next").json()
    texts = {p.response_a for p in store.pairs()} | {p.response_b for p in store.pairs()}
    requests = [("get", "/a/not-a-token"), ("get", "/api/a/not-a-token/next"), ("get", f"/admin/{tokens['alice']}"),
                ("get", f"/admin/{tokens['alice']}/export.jsonl?aggregate=all"), ("get", "/admin/x"),
                ("get", f"/admin/{ADMIN}x"), ("get", "/admin/%20"), ("get", "/admin/caf%C3%A9"),
                ("post", "/a/not-a-token/label"), ("post", "/a/not-a-token/skip"),
                ("post", "/api/a/not-a-token/label")]  # fmt: skip
    for method, path in requests:
        form = {"assignment": alice["assignment"], "choice": "left"} if method == "post" else None
        response = client.request(method, path, data=form)
        assert response.status_code == 403, path
        assert not any(text in response.text for text in texts), path
    # bob posting alice's assignment, by the form, the API and a skip
    stolen = {"assignment": alice["assignment"], "choice": "left", "strength": None, "comment": ""}
    assert client.post(f"/api/a/{tokens['bob']}/label", json=stolen).status_code == 403
    assert client.post(f"/a/{tokens['bob']}/label", data={**stolen, "strength": ""}).status_code == 403
    assert client.post(f"/a/{tokens['bob']}/skip", data={"assignment": alice["assignment"]}).status_code == 403
    assert store.labels() == [] and store.progress("alice").skipped == 0


def test_unknown_paths_get_404(setup):
    client, _, tokens = setup
    token = tokens["alice"]
    for path in ["/", "/../etc/passwd", "/a/..%2F..%2Fetc%2Fpasswd", f"/a/{token}/..%2F..%2Fetc%2Fpasswd",
                 f"/a/{token}/x", "/admin", "/admin/", "/docs", "/redoc", "/openapi.json", "/static/app.js",
                 "/a/", "/api/a/"]:  # fmt: skip
        response = client.get(path)
        assert response.status_code == 404, path
        assert "root:" not in response.text


def test_model_text_is_shown_escaped(tmp_path):
    rows = [{"id": "x1", "prompt": f"prompt {IMAGE}", "response_a": f"A says {SCRIPT}", "response_b": f"B {IMAGE}"}]
    pairs = write_pairs(tmp_path / "pairs.jsonl", rows)
    store = Store.create_or_open(tmp_path / "labels.sqlite", pairs, 1, 0.0, 0, "pairs.jsonl")
    client = TestClient(app_of(store))
    page = client.get(f"/a/{store.add_annotator('eve')}").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert escape(SCRIPT) in page and escape(IMAGE) in page and escape(f"prompt {IMAGE}") in page
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page
    store.close()


def test_done_page_after_the_last_pair(setup):
    client, store, tokens = setup
    token = tokens["carol"]
    for _ in range(6):
        fields = page_fields(client.get(f"/a/{token}").text)
        client.post(f"/a/{token}/label", data={"assignment": fields["assignment"], "choice": "right"})
    page = client.get(f"/a/{token}").text
    assert "Done, thank you" in page and '<strong id="done-count">6</strong>' in page
    assert client.get(f"/api/a/{token}/next").json() == {"assignment": None}
    assert len(store.labels()) == 6


def test_dashboard_and_exports(setup):
    client, store, tokens = setup
    for token in tokens.values():
        for choice in ("left", "right", "tie"):
            shown = client.get(f"/api/a/{token}/next").json()
            client.post(f"/api/a/{token}/label", json={"assignment": shown["assignment"], "choice": choice})
    page = client.get(f"/admin/{ADMIN}")
    assert page.status_code == 200 and "content-security-policy" in page.headers
    for name in tokens:
        assert f'<td>{name}</td><td class="num">3</td>' in page.text
    assert "pay per hour (estimate)" in page.text and "an estimate from the median time" in page.text
    assert "needs ≥ 5 pairs with 2+ labels, has" in page.text
    assert re.search(r'id="labels-total">9<', page.text)
    rows = [json.loads(line) for line in client.get(f"/admin/{ADMIN}/export.jsonl?aggregate=all").text.splitlines()]
    labels = [label for label in store.labels() if label.choice in ("a", "b")]
    assert [(r["pair_id"], r["annotator_id"], r["choice"]) for r in rows] == [
        (label.pair_id, label.annotator, label.choice) for label in labels
    ]
    with_ties = client.get(f"/admin/{ADMIN}/export.jsonl?aggregate=all&keep_ties=1").text.splitlines()
    assert len(with_ties) == 9
    majority = client.get(f"/admin/{ADMIN}/export.jsonl?aggregate=majority")
    assert majority.status_code == 200 and all("votes" in json.loads(line) for line in majority.text.splitlines())
    assert client.get(f"/admin/{ADMIN}/export.jsonl?aggregate=mode").status_code == 400


def test_dashboard_escapes_settings_and_shows_no_pay_without_it(tmp_path):
    pairs = write_pairs(tmp_path / "p<b>.jsonl", plain_rows(2))
    store = Store.create_or_open(tmp_path / "labels.sqlite", pairs, 1, 0.0, 0, "p<b>.jsonl")
    page = TestClient(create_app(store, ADMIN)).get(f"/admin/{ADMIN}").text
    assert "p&lt;b&gt;.jsonl" in page and "p<b>" not in page
    assert "pay per hour" not in page and "No annotators yet" in page
    store.close()


# ---- serve's checks before anything is written ----


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    """serve's options on a pairs file of 3 plain pairs and a check, on a free port unless ``extra`` says."""
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    pairs = write_pairs(tmp_path / "pairs.jsonl", plain_rows(3))
    given = ["--pairs", str(pairs), "--db", str(tmp_path / "labels.sqlite"), "--port", str(free_port()), *extra]
    return parser.parse_args(given)


def test_serve_refuses_a_port_in_use_before_writing_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as caught:
            server.run(serve_args(tmp_path, "--port", str(port)))
    assert str(caught.value) == f"--port {port}: address 127.0.0.1:{port} is in use"
    assert caught.value.exit_code == 2
    assert not (tmp_path / "labels.sqlite").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--port", "70000"], "--port 70000: expected a port from 1 to 65535"),
        (["--admin-token", "short"], "--admin-token: use 16 to 128"),
        (["--pay-per-label", "-1"], "--pay-per-label -1.0: expected a positive amount"),
        (["--currency", "<b>"], "--currency '<b>'"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not a known host"),
        (["--overlap", "0"], "--overlap must be at least 1"),
    ],
)
def test_serve_bad_options_are_one_line_and_write_nothing(tmp_path, extra, message):
    with pytest.raises(UserError) as caught:
        server.run(serve_args(tmp_path, *extra))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not (tmp_path / "labels.sqlite").exists()


def test_serve_settings_default_to_the_database_then_to_the_defaults(tmp_path):
    args = serve_args(tmp_path)
    assert server.settings_for(args) == {"overlap": 3, "gold_rate": 0.1, "seed": 0}
    store = Store.create_or_open(Path(args.db), Path(args.pairs), 2, 0.5, 7, args.pairs)
    store.close()
    assert server.settings_for(args) == {"overlap": 2, "gold_rate": 0.5, "seed": 7}
    assert server.settings_for(serve_args(tmp_path, "--seed", "9"))["seed"] == 9
