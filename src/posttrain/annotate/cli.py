"""``posttrain annotate ACTION``: sample pairs, serve them to people, register annotators, export labels.

    posttrain annotate sample --model M --prompts P --per-prompt 2 --output PAIRS.jsonl
    posttrain annotate serve ...                      (the web app: ``posttrain.annotate.server``)
    posttrain annotate add-annotator NAME --db DB [--url http://127.0.0.1:8000]
    posttrain annotate export --db DB --output PREFS.jsonl [--aggregate majority|reliability|all] [--keep-ties]

``add-annotator`` prints the person's private link; ``export`` writes TRL preference rows (see
``posttrain.annotate.export``). The web app's options are added only when ``serve`` is parsed, so
its imports (FastAPI, uvicorn) never slow down the other commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from posttrain import config as config_io
from posttrain.annotate.sample import SampleConfig
from posttrain.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


class _SubParser(argparse.ArgumentParser):
    """A sub-command parser that can add its arguments only when it is used (``load_arguments``)."""

    def __init__(self, *args, load_arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_arguments = load_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self.load_arguments is not None:
            load, self.load_arguments = self.load_arguments, None
            load(self)
        return super().parse_known_args(args, namespace)


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    from posttrain.annotate import server

    server.add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_SubParser)
    described = {
        "sample": "sample pairs of a model's answers to prompts, as a pairs file to label",
        "serve": "serve a pairs file to annotators in the browser; labels go to a SQLite database",
        "add-annotator": "register an annotator in a database and print their private link",
        "export": "write the labels as preference rows (TRL's format, with provenance) for rm and dpo",
    }
    subs = {}
    for name, description in described.items():
        load = _server_arguments if name == "serve" else None
        subs[name] = actions.add_parser(name, help=description, description=description, load_arguments=load)
        # --debug is read by posttrain's main; SUPPRESS keeps a value given before ACTION
        subs[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show the full traceback of errors")  # fmt: skip
    config_io.add_arguments(subs["sample"], SampleConfig)
    add = subs["add-annotator"]
    add.add_argument("name", metavar="NAME", help="the annotator's name: letters, digits, '.', '_', '@', '-'")
    add.add_argument("--db", required=True, help="the annotate database (made by serve)")
    add.add_argument("--url", default=DEFAULT_URL, help=f"where the server is reached (default: {DEFAULT_URL})")
    export = subs["export"]
    export.add_argument("--db", required=True, help="the annotate database")
    export.add_argument("--output", required=True, help="the preference file to write (.jsonl)")
    export.add_argument("--aggregate", choices=("majority", "reliability", "all"), default="majority",
                        help="one row per pair by majority vote or by Dawid–Skene, or one row per label "
                        "(default: majority)")  # fmt: skip
    export.add_argument("--keep-ties", action="store_true", help="keep ties as rows (chosen = response_a)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def run(args: argparse.Namespace) -> None:
    actions = {"sample": _sample, "serve": _serve, "add-annotator": _add_annotator, "export": _export}
    actions[args.action](args)


def _sample(args: argparse.Namespace) -> None:
    from posttrain.annotate.sample import run_sample

    config = config_io.resolve(SampleConfig, args)
    written, dropped = run_sample(config)
    print(f"wrote {written} pairs to {config.output} (dropped {dropped} with identical or empty answers)")


def _serve(args: argparse.Namespace) -> None:
    from posttrain.annotate import server

    server.run(args)


def _add_annotator(args: argparse.Namespace) -> None:
    from posttrain.annotate.store import Store

    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"--url {args.url}: expected http://HOST:PORT or https://HOST")
    store = Store.open(Path(args.db))
    try:
        token = store.add_annotator(args.name)
    finally:
        store.close()
    print(f"{args.url.rstrip('/')}/a/{token}")


def _export(args: argparse.Namespace) -> None:
    from posttrain.annotate.export import build_rows
    from posttrain.annotate.pairs import write_jsonl
    from posttrain.annotate.store import Store

    output = Path(args.output).expanduser()
    if output.suffix != ".jsonl":
        raise UserError(f"--output {args.output}: the export is JSON Lines; name it *.jsonl")
    store = Store.open(Path(args.db))
    try:
        for what, path in (("--db", args.db), ("the pairs file", store.settings()["pairs_file"])):
            if output.resolve() == Path(path).expanduser().resolve():
                raise UserError(f"--output {args.output}: is {what} {path}; write the export somewhere else")
        if output.exists() and not args.overwrite:
            raise UserError(f"--output {args.output}: exists; pass --overwrite to replace it")
        labels, pairs = store.labels(), store.pairs()
    finally:
        store.close()
    if not labels:
        raise UserError(f"{args.db}: no labels yet")
    rows, dropped = build_rows(pairs, labels, args.aggregate, args.keep_ties)
    if not rows:
        raise UserError(f"{args.db}: all {dropped} rows would be ties; pass --keep-ties to export them")
    write_jsonl(output, rows)
    print(f"wrote {len(rows)} rows to {args.output} (dropped {dropped} ties)")
