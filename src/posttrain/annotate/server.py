"""``posttrain annotate serve``: the labelling web app on a pairs file, labels in a SQLite database.

    posttrain annotate serve --pairs PAIRS.jsonl --db LABELS.sqlite [--overlap 3] [--gold-rate 0.1] [--seed 0]
        [--host 127.0.0.1] [--port 8000] [--admin-token T] [--pay-per-label X] [--currency USD]

Everything is checked before anything is written: the options, that the port is free, then the
pairs file (``Store.create_or_open`` validates it in full before it creates the database). A
restart on the same database resumes where it stopped; --overlap, --gold-rate and --seed default
to the values stored in it. The server listens on 127.0.0.1 unless --host says otherwise; links
carry the only credentials, so anything beyond a trusted network belongs behind HTTPS.
"""

from __future__ import annotations

import argparse
import errno
import math
import re
import secrets
import socket
from pathlib import Path

from posttrain.annotate.store import Store
from posttrain.errors import UserError

DEFAULTS = {"overlap": 3, "gold_rate": 0.1, "seed": 0}  # for a new database
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
CURRENCY_PATTERN = re.compile(r"[A-Za-z]{1,8}|[^\s<>&\"']{1,3}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--pairs", required=True, help="the pairs to label (.jsonl: prompt, response_a, response_b)")
    add("--db", required=True, help="the SQLite database of the labels (created when missing)")
    add("--overlap", type=int, default=None, help="labels per pair from distinct people (default: 3, or the db's)")
    add(
        "--gold-rate",
        type=float,
        default=None,
        help="share of assignments that are known-answer checks, drawn from the pairs with 'gold' "
        "(default: 0.1, or 0 when no pair has gold, or the database's)",
    )
    add("--seed", type=int, default=None, help="seed of the orders and sides (default: 0, or the database's)")
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    add("--admin-token", default=None, help="secret of the admin's link (16+ of A-Z a-z 0-9 - _; default: random)")
    add("--pay-per-label", type=float, default=None, help="pay per label: the dashboard shows the hourly pay it makes")
    add("--currency", default="USD", help="currency of --pay-per-label (default: USD)")


def check_options(args: argparse.Namespace) -> None:
    """The options that need no file: UserError naming the option."""
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected a port from 1 to 65535")
    if args.admin_token is not None and not TOKEN_PATTERN.fullmatch(args.admin_token):
        raise UserError("--admin-token: use 16 to 128 letters, digits, '-' or '_' (it is a password in a link)")
    if args.pay_per_label is not None and not (math.isfinite(args.pay_per_label) and args.pay_per_label > 0):
        raise UserError(f"--pay-per-label {args.pay_per_label}: expected a positive amount")
    if not CURRENCY_PATTERN.fullmatch(args.currency):
        raise UserError(f"--currency {args.currency!r}: expected a code such as USD or EUR")


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) once and let go: UserError when the address is taken or not this machine's.
    SO_REUSEADDR as uvicorn sets it, so a port that uvicorn could bind is never reported taken."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise UserError(f"--host {host}: not a known host name or address") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: address {host}:{port} is in use") from None
            if err.errno == errno.EACCES:
                raise UserError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: not an address of this machine") from None
            raise


def settings_for(args: argparse.Namespace) -> dict[str, float | int]:
    """--overlap, --gold-rate and --seed as given; those not given come from an existing database, else
    from DEFAULTS (gold rate 0 when the pairs file has no gold: the store checks the file)."""
    given = {"overlap": args.overlap, "gold_rate": args.gold_rate, "seed": args.seed}
    db = Path(args.db)
    if db.exists():
        store = Store.open(db)
        try:
            stored = store.settings()
        finally:
            store.close()
        return {key: stored[key] if value is None else value for key, value in given.items()}
    return {key: DEFAULTS[key] if value is None else value for key, value in given.items()}


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def open_store(args: argparse.Namespace) -> Store:
    """The store of --db; a new database from --pairs (default gold rate 0 when no pair has gold)."""
    settings = settings_for(args)
    pairs, db = Path(args.pairs), Path(args.db)
    if args.gold_rate is None and not db.exists():
        from posttrain.annotate.pairs import read_pairs

        if not any(pair.gold for pair in read_pairs(pairs, args.pairs)[0]):
            settings["gold_rate"] = 0.0
    return Store.create_or_open(db, pairs, settings["overlap"], settings["gold_rate"], settings["seed"], args.pairs)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from posttrain.annotate.app import create_app

    check_options(args)
    check_port_free(args.host, args.port)
    store = open_store(args)
    admin_token = args.admin_token or secrets.token_urlsafe(24)
    app = create_app(store, admin_token, args.pay_per_label, args.currency)
    url, settings = url_of(args.host, args.port), store.settings()
    print(f"serving {settings['pairs']} pairs of {args.pairs} (overlap {settings['overlap']}, "
          f"gold rate {settings['gold_rate']}); labels go to {args.db}")  # fmt: skip
    print(f"admin dashboard (keep it secret): {url}/admin/{admin_token}")
    print(f"add an annotator (prints their private link): posttrain annotate add-annotator NAME --db {args.db} "
          f"--url {url}", flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        store.close()
