"""The web app of ``posttrain annotate serve``: annotators label pairs in the browser, the admin watches.

Every route carries a secret token in its path. ``/a/{token}``: one annotator's labelling page
(plain HTML forms; a small inline script adds keyboard shortcuts) and ``/api/a/{token}/...`` the
same as JSON for scripts. ``/admin/{token}``: the dashboard and the exports. A token that is not
an annotator's (or not the admin's), or an assignment of someone else, gets 403 and no data.

The page shows the assignment's ``left`` response on the left, labelled "A", and the other on the
right, labelled "B"; a choice on screen (left / right) is stored in response_a / response_b terms.
Model text is untrusted: Jinja2 autoescapes it and it is shown as text (``white-space: pre-wrap``).
Behind that, every page has a Content-Security-Policy that runs only its own inline script (a
per-response nonce): markup that slipped through escaping could not run.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

import jinja2
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from posttrain.annotate.dashboard import Share, summarise
from posttrain.annotate.export import AGGREGATES, export_rows
from posttrain.annotate.store import Annotator, Assignment, Store
from posttrain.ops.agreement import AnnotatorAccuracy

SCREEN_CHOICES = ("left", "right", "tie", "both_bad")
FORM_STRENGTHS = {"": None, "1": 1, "2": 2, "3": 3}  # the page's radios; "" when none is picked
MAX_COMMENT = 5000  # characters


def share_text(share: Share) -> str:
    """ "57% [25%, 84%] (n = 7)", or "–" without any."""
    if share.value is None:
        return "–"
    return f"{share.value:.0%} [{share.low:.0%}, {share.high:.0%}] (n = {share.n})"


def accuracy_text(accuracy: AnnotatorAccuracy) -> str:
    return share_text(Share(0, accuracy.n, accuracy.accuracy, accuracy.low, accuracy.high))


def number_text(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def money_text(value: float | None, currency: str) -> str:
    return "–" if value is None else f"{value:.2f} {currency}"


def pool_text(value: float | None, n_pairs: int, min_pairs: int) -> str:
    """An agreement statistic, or why it is missing."""
    if value is None:
        return f"needs ≥ {min_pairs} pairs with 2+ labels, has {n_pairs}"
    if math.isnan(value):
        return "undefined: every A/B label chose the same side"
    return f"{value:.3f}"


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("posttrain.annotate", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters.update(
    share=share_text, accuracy=accuracy_text, number=number_text, money=money_text, pool_value=pool_text
)


@dataclass(frozen=True)
class Context:
    """What the routes share: the store, the admin token and the pay shown on the dashboard."""

    store: Store
    admin_token: str
    pay_per_label: float | None
    currency: str


def create_app(store: Store, admin_token: str, pay_per_label: float | None = None, currency: str = "USD") -> FastAPI:
    """The app over ``store``; no documentation routes (nothing is served that the module docstring does not list)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = Context(store, admin_token, pay_per_label, currency)
    app.include_router(router)
    return app


router = APIRouter()


def context_of(request: Request) -> Context:
    return request.app.state.context


def annotator_of(context: Context, token: str) -> Annotator:
    """The token's annotator; 403 (and nothing else) for any other token."""
    annotator = context.store.annotator_by_token(token)
    if annotator is None:
        raise HTTPException(403, "forbidden")
    return annotator


def check_admin(context: Context, token: str) -> None:
    """403 unless ``token`` is the admin token (compared in constant time)."""
    if not secrets.compare_digest(token.encode(), context.admin_token.encode()):
        raise HTTPException(403, "forbidden")


def security_headers(nonce: str) -> dict[str, str]:
    """Only the page's own inline script and style may run; forms post back to this server only; the
    token in the URL is never sent on as a referrer; nothing is cached."""
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
              "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
    return {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}  # fmt: skip


def html_page(template: str, **values: object) -> HTMLResponse:
    nonce = secrets.token_urlsafe(18)
    body = TEMPLATES.get_template(template).render(nonce=nonce, **values)
    return HTMLResponse(body, headers=security_headers(nonce))


def sides(assignment: Assignment) -> tuple[str, str]:
    """(text shown on the left, text shown on the right)."""
    pair = assignment.pair
    if assignment.left == "a":
        return pair.response_a, pair.response_b
    return pair.response_b, pair.response_a


def stored_choice(choice: str, left: str) -> str:
    """A choice on screen ("left", "right", "tie", "both_bad") in response_a / response_b terms, given
    which response (``left``: "a" or "b") was shown on the left."""
    if choice == "left":
        return left
    if choice == "right":
        return "b" if left == "a" else "a"
    return choice


def record(
    context: Context, annotator: str, assignment_id: int, choice: str, strength: int | None, comment: str
) -> bool:
    """Store a label given on screen; True when recorded now, False when it was already (a repeated post).
    400 for bad values, 403 when the assignment is not the annotator's, 409 when they skipped it."""
    if choice not in SCREEN_CHOICES:
        raise HTTPException(400, f"choice must be one of {', '.join(SCREEN_CHOICES)}")
    if len(comment) > MAX_COMMENT:
        raise HTTPException(400, f"comment is longer than {MAX_COMMENT} characters")
    try:
        assignment = context.store.assignment(annotator, assignment_id)
    except LookupError:
        raise HTTPException(403, "forbidden") from None
    try:
        return context.store.record_label(annotator, assignment_id, stored_choice(choice, assignment.left),
                                          strength, comment)  # fmt: skip
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    except LookupError:  # the assignment is theirs, so it was skipped
        raise HTTPException(409, "this pair was skipped") from None


def skip(context: Context, annotator: str, assignment_id: int) -> None:
    """Skip the annotator's assignment; 403 when it is not theirs, 409 when they labelled it already."""
    try:
        context.store.assignment(annotator, assignment_id)
    except LookupError:
        raise HTTPException(403, "forbidden") from None
    try:
        context.store.skip(annotator, assignment_id)
    except LookupError:
        raise HTTPException(409, "this pair was labelled already") from None


def assignment_id_of(value: object) -> int:
    """The posted assignment id: an integer (a JSON number or a form's digits)."""
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise HTTPException(400, "assignment must be an assignment id (an integer)")


# --- the labelling page --------------------------------------------------------------------------


@router.get("/a/{token}")
def labelling_page(request: Request, token: str) -> HTMLResponse:
    context = context_of(request)
    annotator = annotator_of(context, token).name
    assignment = context.store.next_assignment(annotator)
    progress = context.store.progress(annotator)
    if assignment is None:
        return html_page("done.html", name=annotator, progress=progress)
    left, right = sides(assignment)
    return html_page("label.html", token=token, assignment=assignment, left=left, right=right, progress=progress)


@router.post("/a/{token}/label")
async def label_form(request: Request, token: str) -> RedirectResponse:
    """The page's form: assignment, choice (left/right/tie/both_bad), strength ("" or 1-3), comment. The
    strength radios stay as set whatever button is pressed, so a tie or both-bad drops the strength."""
    context = context_of(request)
    annotator = (await run_in_threadpool(annotator_of, context, token)).name
    form = await request.form()
    assignment_id, choice = assignment_id_of(form.get("assignment")), str(form.get("choice", ""))
    strength_text, comment = form.get("strength", ""), form.get("comment", "")
    if strength_text not in FORM_STRENGTHS or not isinstance(comment, str):
        raise HTTPException(400, "strength must be 1, 2 or 3 and comment text")
    strength = FORM_STRENGTHS[strength_text] if choice in ("left", "right") else None
    await run_in_threadpool(record, context, annotator, assignment_id, choice, strength, comment.strip())
    return RedirectResponse(f"/a/{token}", status_code=303)


@router.post("/a/{token}/skip")
async def skip_form(request: Request, token: str) -> RedirectResponse:
    context = context_of(request)
    annotator = (await run_in_threadpool(annotator_of, context, token)).name
    form = await request.form()
    await run_in_threadpool(skip, context, annotator, assignment_id_of(form.get("assignment")))
    return RedirectResponse(f"/a/{token}", status_code=303)


# --- the JSON API (scripts, load tests) ----------------------------------------------------------


@router.get("/api/a/{token}/next")
def api_next(request: Request, token: str) -> dict:
    """The annotator's current pair, {"assignment": null} when nothing is left."""
    context = context_of(request)
    assignment = context.store.next_assignment(annotator_of(context, token).name)
    if assignment is None:
        return {"assignment": None}
    left, right = sides(assignment)
    return {"assignment": assignment.id, "pair_id": assignment.pair.id, "prompt": assignment.pair.prompt,
            "left": left, "right": right, "is_check": assignment.is_check}  # fmt: skip


@router.post("/api/a/{token}/label")
async def api_label(request: Request, token: str) -> dict:
    """JSON {"assignment", "choice": left|right|tie|both_bad, "strength": null|1|2|3, "comment"} ->
    {"recorded": true}, or false when that assignment was labelled already (nothing is duplicated)."""
    context = context_of(request)
    annotator = (await run_in_threadpool(annotator_of, context, token)).name
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    choice, strength, comment = body.get("choice"), body.get("strength"), body.get("comment", "")
    if not isinstance(choice, str) or not isinstance(comment, str):
        raise HTTPException(400, "choice and comment must be strings")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int)):
        raise HTTPException(400, "strength must be null, 1, 2 or 3")
    assignment_id = assignment_id_of(body.get("assignment"))
    recorded = await run_in_threadpool(record, context, annotator, assignment_id, choice, strength, comment)
    return {"recorded": recorded}


# --- the admin's pages ---------------------------------------------------------------------------


@router.get("/admin/{token}")
def dashboard_page(request: Request, token: str) -> HTMLResponse:
    context = context_of(request)
    check_admin(context, token)
    store, settings = context.store, context.store.settings()
    names = [annotator.name for annotator in store.annotators()]
    stats = summarise(store.labels(), store.pairs(), names, settings["overlap"], context.pay_per_label)
    return html_page("dashboard.html", token=token, stats=stats, settings=settings,
                     pay_per_label=context.pay_per_label, currency=context.currency, aggregates=AGGREGATES)  # fmt: skip


@router.get("/admin/{token}/export.jsonl")
def export(request: Request, token: str, aggregate: str = "majority", keep_ties: str = "0") -> Response:
    """The labels as preference rows (``posttrain.annotate.export``), JSON Lines."""
    context = context_of(request)
    check_admin(context, token)
    if aggregate not in AGGREGATES:
        raise HTTPException(400, f"aggregate must be one of {', '.join(AGGREGATES)}")
    if keep_ties not in ("0", "1"):
        raise HTTPException(400, "keep_ties must be 0 or 1")
    rows = export_rows(context.store, aggregate, keep_ties == "1")
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    headers = {"Content-Disposition": f'attachment; filename="labels-{aggregate}.jsonl"', "Cache-Control": "no-store"}
    return Response(body, media_type="application/jsonl", headers=headers)
