"""``dtucenter``: offline administration of the center's database.

It talks to the database directly (no running center needed); SQLite's WAL
mode lets it do so beside a running center. ``template list|show`` need no database.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dtucenter import __version__
from dtucenter.adoption import (
    AdoptionRefused,
    definitions,
    device_json,
    owner_id,
    record_dtu_adoption,
    record_link_adoption,
)
from dtucenter.config import DEFAULT_DB_URL, ConfigError, read_link_definition, read_meter_definition
from dtucenter.discovery import DTU, PendingDevice
from dtucenter.isotime import parse_iso_time
from dtucenter.modbus.templates import (
    TemplateCatalog,
    parse_template,
    read_template,
    shipped_template_text,
    shipped_templates,
)
from dtucenter.store import accounts, meters, queries, schema
from dtucenter.store import links as device_links
from dtucenter.store import pending as pending_rows
from dtucenter.store import templates as stored_templates
from dtucenter.store.db import DatabaseURLError, open_engine
from dtucenter.store.recorder import link_spec, meter_spec

SAMPLE_COLUMNS = ("time", "psn", "net_state", "position", "dev", "addr", "value")
METER_SAMPLE_COLUMNS = ("time", "meter", "point", "value")
EXAMPLES = {
    "link": '{"name": "site-a", "registration": "DTU-0001", "heartbeat": "HB"}',
    "meter": '{"name": "m1", "link": "site-a", "unit": 1, "template": "eastron-sdm120"}',
}
#: The CLI does not know which file the center reads: named in a refusal as its option.
CONFIG_FILE = "(--config)"


class CommandError(Exception):
    """Reported as one line on stderr with exit status 1."""


def _psn(text: str) -> int:
    try:
        return queries.check_psn(int(text, 0))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "PSN" in str(e) else f"not a PSN: {text!r}") from None


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}")
        return value

    return parse


def parse_time(text: str) -> dt.datetime:
    try:
        return parse_iso_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtucenter", description="Administer the dtucenter database.")
    parser.add_argument("--version", action="version", version=f"dtucenter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_db(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--db", default=DEFAULT_DB_URL, help=f"SQLAlchemy URL (default {DEFAULT_DB_URL})")
        return sub

    dtu = commands.add_parser("dtu", help="DTU records").add_subparsers(dest="action", required=True, metavar="ACTION")
    add = with_db(dtu.add_parser("add", help="add a DTU, or update one that exists"))
    add.add_argument("psn", type=_psn)
    add.add_argument("--password", type=_bounded(0, 0xFFFFFFFF),
                     help="PASS it must log in with (0, the default: take and keep its first PASS)")
    add.add_argument("--name", help="a name for people")
    add.add_argument("--tick-time", type=_bounded(1, 255), help="heartbeat interval sent in LoginAck (s)")
    add.add_argument("--send-test-time", type=_bounded(0, 255), help="upload interval sent in LoginAck (s)")
    add.add_argument("--account", help="the account that owns it (a new DTU: the first admin account unless given)")
    add.set_defaults(run=cmd_dtu_add)
    listing = with_db(dtu.add_parser("list", help="list DTUs"))
    listing.add_argument("--account", help="only this account's")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=cmd_dtu_list)
    remove = with_db(dtu.add_parser("remove", help="delete a DTU with its register list and samples"))
    remove.add_argument("psn", type=_psn)
    remove.set_defaults(run=cmd_dtu_remove)

    samples = with_db(commands.add_parser(
        "samples", help="print stored samples of a DTU (by PSN) or of a Modbus meter (--meter)",
        usage="%(prog)s (PSN | --meter NAME [--point POINT]) [options]",
    ))
    samples.add_argument("psn", type=_psn, nargs="?", help="the DTU's PSN")
    samples.add_argument("--meter", help="a Modbus meter's name, instead of a PSN")
    samples.add_argument("--point", help="with --meter: only this point")
    samples.add_argument("--since", type=parse_time, help="ISO 8601 time (UTC unless it says otherwise)")
    samples.add_argument("--until", type=parse_time, help="ISO 8601 time, exclusive")
    samples.add_argument("--limit", type=_bounded(1, 10_000_000), help="at most this many rows, the first in --order")
    samples.add_argument("--order", choices=("asc", "desc"), default="asc",
                         help="asc: oldest first (the default); desc: newest first")
    samples.add_argument("--format", choices=("csv", "json"), default="csv")
    samples.set_defaults(run=cmd_samples, check=_check_sample_source, subparser=samples)

    account = commands.add_parser("account", help="accounts, which own DTUs and meters").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = with_db(account.add_parser("add", help="add an account"))
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="an admin account: sees and manages every account's")
    add.set_defaults(run=cmd_account_add)
    listing = with_db(account.add_parser("list", help="list accounts with what they own"))
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=cmd_account_list)
    remove = with_db(account.add_parser("remove", help="remove an account that owns nothing, with its tokens"))
    remove.add_argument("name")
    remove.set_defaults(run=cmd_account_remove)

    token = commands.add_parser("token", help="an account's API tokens").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = with_db(token.add_parser("add", help="make a token and print it: the only time it is shown"))
    add.add_argument("account")
    add.add_argument("name", help="the token's name, as the audit trails will name who acted")
    add.set_defaults(run=cmd_token_add)
    listing = with_db(token.add_parser("list", help="list an account's tokens by name (never the tokens)"))
    listing.add_argument("account")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=cmd_token_list)
    revoke = with_db(token.add_parser("revoke", help="revoke a token: it stops working at once"))
    revoke.add_argument("account")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_token_revoke)

    db = commands.add_parser("db", help="the database schema").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    with_db(db.add_parser("upgrade", help="bring the schema to this release's (what the center does at start)")
            ).set_defaults(on_engine=cmd_db_upgrade)
    with_db(db.add_parser("current", help="the schema revision the database is at")
            ).set_defaults(on_engine=cmd_db_current)
    with_db(db.add_parser("history", help="the schema revisions this release knows, oldest first")
            ).set_defaults(on_engine=cmd_db_history)

    template = commands.add_parser(
        "template", help="the meter templates shipped with the center, and accounts' own"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = template.add_parser("list", help="list the shipped templates, and with --db the accounts' own")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.add_argument("--db", help="also the accounts' own templates stored in this database (SQLAlchemy URL)")
    listing.add_argument("--account", help="with --db: only this account's own")
    listing.set_defaults(offline=cmd_template_list)
    show = template.add_parser("show", help="print a template's file, to read or to copy as one's own")
    show.add_argument("name")
    show.set_defaults(offline=cmd_template_show)
    add = with_db(template.add_parser(
        "add", help="add an account's template from its file, or replace it with a higher version "
                    "(taken up at the next start)"))
    add.add_argument("file", help="a template file, as 'template show' prints one")
    add.add_argument("--account", help="the owning account (default: the first admin account)")
    add.set_defaults(run=cmd_template_add)
    remove = with_db(template.add_parser("remove", help="remove an account's template no meter is made from"))
    remove.add_argument("name")
    remove.add_argument("--account", help="the owning account (default: the first admin account)")
    remove.set_defaults(run=cmd_template_remove)

    for kind, what in (("link", "Modbus links"), ("meter", "Modbus meters")):
        device = commands.add_parser(kind, help=f"{what} in the database (taken up at the next start)").add_subparsers(
            dest="action", required=True, metavar="ACTION")
        add = with_db(device.add_parser("add", help=f"add a {kind}: its [[{kind}]] table as JSON, the file's keys"))
        add.add_argument("definition", help=f"e.g. {EXAMPLES[kind]}")
        add.add_argument("--account", help="the owning account (default: the first admin account)")
        add.set_defaults(run=partial(cmd_device_add, kind))
        listing = with_db(device.add_parser("list", help=f"list {kind}s with their owner and definition"))
        listing.add_argument("--account", help="only this account's")
        listing.add_argument("--json", action="store_true", help="JSON instead of a table")
        listing.set_defaults(run=partial(cmd_device_list, kind))
        remove = with_db(device.add_parser("remove", help=f"remove a {kind} added through the API or the CLI"))
        remove.add_argument("name")
        remove.set_defaults(run=partial(cmd_device_remove, kind))

    pending = commands.add_parser(
        "pending", help="devices that dialled in unknown (adopted here: served from the center's next start)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = with_db(pending.add_parser("list", help="list pending devices, oldest first"))
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=cmd_pending_list)
    adopt = with_db(pending.add_parser(
        "adopt", help="make a pending device's link (and meter, from a template) or DTU record in an account"
    ))
    adopt.add_argument("id")
    adopt.add_argument("--account", help="the owning account (default: the first admin account)")
    adopt.add_argument("--template", help="the new meter's template (Modbus only; none: no meter)")
    adopt.add_argument("--unit", type=int, default=1, help="the meter's unit id (default 1)")
    adopt.add_argument("--interval", type=float, default=10.0, help="seconds between the meter's polls (default 10)")
    adopt.set_defaults(run=cmd_pending_adopt)
    drop = with_db(pending.add_parser("drop", help="forget a pending device"))
    drop.add_argument("id")
    drop.set_defaults(run=cmd_pending_drop)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    if hasattr(args, "check"):
        args.check(args.subparser, args)
    if hasattr(args, "offline"):
        try:
            args.offline(args, out)
        except CommandError as e:
            print(f"dtucenter: {e}", file=sys.stderr)
            return 1
        return 0
    # The db commands look at the schema themselves; the others need it at this release's head.
    on_engine = getattr(args, "on_engine", None)
    try:
        engine = open_engine(args.db, create=on_engine is None)
    except (DatabaseURLError, schema.SchemaError) as e:
        print(f"dtucenter: --db: {e}", file=sys.stderr)
        return 1
    try:
        if on_engine is not None:
            on_engine(engine, out)
        else:
            with Session(engine) as session, session.begin():
                args.run(session, args, out)
    except (CommandError, schema.SchemaError) as e:
        print(f"dtucenter: {e}", file=sys.stderr)
        return 1
    except SQLAlchemyError as e:
        print(f"dtucenter: database error: {e.__class__.__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    finally:
        engine.dispose()
    return 0


def cmd_dtu_add(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    fields = {
        key: value
        for key, value in (
            ("password", args.password),
            ("name", args.name),
            ("tick_time", args.tick_time),
            ("send_test_time", args.send_test_time),
        )
        if value is not None
    }
    try:
        owner = None if args.account is None else accounts.account_id(session, args.account)
        info, created = queries.upsert_dtu(session, args.psn, fields, dt.datetime.now(dt.UTC), owner)
    except ValueError as e:  # AccountError among them
        raise CommandError(str(e)) from None
    print(f"{'added' if created else 'updated'} DTU {info.psn}", file=out)


def cmd_dtu_list(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        owner = None if args.account is None else accounts.account_id(session, args.account)
    except accounts.AccountError as e:
        raise CommandError(str(e)) from None
    dtus = queries.list_dtus(session, owner)
    if args.json:
        json.dump({"dtus": [d.to_json() for d in dtus]}, out, indent=2)
        out.write("\n")
        return
    rows = [("PSN", "NAME", "ONLINE", "REMOTE", "LAST SEEN", "TICK", "SEND", "ACCOUNT")]
    for d in dtus:
        rows.append((
            str(d.psn), d.name, "yes" if d.online else "no", d.remote or "-",
            d.last_seen.isoformat(timespec="seconds") if d.last_seen else "-",
            str(d.tick_time), str(d.send_test_time), d.account,
        ))
    _print_table(rows, out)


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip(), file=out)


# -- accounts and tokens -------------------------------------------------------------------------


def _refused(e: accounts.AccountError) -> CommandError:
    return CommandError(str(e))


def cmd_account_add(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        info = accounts.create_account(session, args.name, args.admin, dt.datetime.now(dt.UTC))
    except accounts.AccountError as e:
        raise _refused(e) from None
    print(f"added {'admin ' if info.admin else ''}account {info.name}", file=out)


def cmd_account_list(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    found = accounts.list_accounts(session)
    if args.json:
        json.dump({"accounts": [a.to_json() for a in found]}, out, indent=2)
        out.write("\n")
        return
    rows = [("NAME", "ADMIN", "DTUS", "METERS", "TOKENS")]
    rows += [(a.name, "yes" if a.admin else "no", str(a.dtus), str(a.meters), str(a.tokens)) for a in found]
    _print_table(rows, out)


def cmd_account_remove(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        accounts.remove_account(session, args.name)
    except accounts.AccountError as e:
        raise _refused(e) from None
    print(f"removed account {args.name}", file=out)


def cmd_token_add(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        token = accounts.create_token(session, args.account, args.name, dt.datetime.now(dt.UTC))
    except accounts.AccountError as e:
        raise _refused(e) from None
    # The token alone on stdout, for scripts: TOKEN=$(dtucenter token add acme ops)
    print(token, file=out)
    print(f"dtucenter: token {args.name} of account {args.account}: shown this once, store it now", file=sys.stderr)


def cmd_token_list(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        found = accounts.list_tokens(session, args.account)
    except accounts.AccountError as e:
        raise _refused(e) from None
    if args.json:
        json.dump({"tokens": [t.to_json() for t in found]}, out, indent=2)
        out.write("\n")
        return
    rows = [("NAME", "CREATED")]
    rows += [(t.name, t.created.isoformat(timespec="seconds") if t.created else "-") for t in found]
    _print_table(rows, out)


def cmd_token_revoke(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        accounts.revoke_token(session, args.account, args.name)
    except accounts.AccountError as e:
        raise _refused(e) from None
    print(f"revoked token {args.name} of account {args.account}", file=out)


def cmd_dtu_remove(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    if not queries.delete_dtu(session, args.psn):
        raise CommandError(f"no DTU {args.psn}")
    print(f"removed DTU {args.psn}", file=out)


def _check_sample_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.psn is None) == (args.meter is None):
        parser.error("give either a PSN or --meter NAME")
    if args.point is not None and args.meter is None:
        parser.error("--point goes with --meter")


def cmd_samples(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    if args.meter is not None:
        _meter_samples(session, args, out)
        return
    if queries.get_dtu(session, args.psn) is None:
        raise CommandError(f"no DTU {args.psn}")
    rows = queries.query_samples(session, args.psn, args.since, args.until, args.limit, args.order == "desc")
    _print_samples(out, args.format, rows, SAMPLE_COLUMNS, _csv_row)


def _meter_samples(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    meter = meters.get_meter(session, args.meter)
    if meter is None:
        raise CommandError(f"no meter {args.meter!r}")
    rows = meters.query_meter_samples(
        session, meter, args.point, args.since, args.until, args.limit, args.order == "desc")
    _print_samples(out, args.format, rows, METER_SAMPLE_COLUMNS, _meter_csv_row)


def _print_samples(
    out: TextIO, form: str, rows: Sequence[Any], columns: Sequence[str], csv_row: Callable[[Any], list[Any]]
) -> None:
    if form == "json":
        json.dump({"samples": [r.to_json() for r in rows]}, out, indent=2)
        out.write("\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(csv_row(r))


def _meter_csv_row(r: meters.MeterSampleInfo) -> list[Any]:
    # As in JSON: a bool reads true/false, a value that was NaN or infinite is empty.
    value = "" if r.value is None else json.dumps(r.value)
    return [r.time.isoformat(), r.meter, r.point, value]


def _csv_row(r: queries.SampleInfo) -> list[Any]:
    return [
        r.time.isoformat(), r.psn, r.net_state, r.position,
        "" if r.dev is None else r.dev, "" if r.addr is None else r.addr, r.value,
    ]


def cmd_db_upgrade(engine: Engine, out: TextIO) -> None:
    print(schema.upgrade(engine).describe(), file=out)


def cmd_db_current(engine: Engine, out: TextIO) -> None:
    print(schema.current(engine).describe(), file=out)


def cmd_db_history(engine: Engine, out: TextIO) -> None:
    at = schema.current(engine).revisions
    for revision, doc in schema.history():
        marks = [mark for mark, shown in (("head", revision == schema.head()), ("current", revision in at)) if shown]
        print(f"{revision}  {doc}" + (f"  ({', '.join(marks)})" if marks else ""), file=out)


def cmd_template_list(args: argparse.Namespace, out: TextIO) -> None:
    """As ``GET /api/templates``: the shipped ones (``account`` None), then the accounts' own."""
    summaries: list[dict[str, Any]] = [
        {**template.summary(), "account": None} for template in shipped_templates().values()
    ]
    if args.db is not None:
        summaries += _stored_summaries(args.db, args.account)
    elif args.account is not None:
        raise CommandError("--account lists an account's own templates: give --db too")
    if args.json:
        json.dump({"templates": summaries}, out, indent=2)
        out.write("\n")
        return
    for summary in summaries:
        owner = f"\taccount {summary['account']}" if summary["account"] is not None else ""
        out.write(f"{summary['name']}\tversion {summary['version']}\t{summary['points']} points{owner}\t"
                  f"{summary['description']}\n")


def _stored_summaries(url: str, account: str | None) -> list[dict[str, Any]]:
    try:
        engine = open_engine(url)
    except (DatabaseURLError, schema.SchemaError) as e:
        raise CommandError(f"--db: {e}") from None
    try:
        with Session(engine) as session:
            owner = None if account is None else accounts.account_id(session, account)
            rows = stored_templates.list_templates(session, owner)
    except accounts.AccountError as e:
        raise CommandError(str(e)) from None
    finally:
        engine.dispose()
    return [
        {**read_template(json.loads(row.document), f"database: template {row.name!r}").summary(),
         "account": row.account}
        for row in rows
    ]


def cmd_template_show(args: argparse.Namespace, out: TextIO) -> None:
    try:
        out.write(shipped_template_text(args.name))
    except LookupError as e:
        raise CommandError(str(e)) from None


#: Who the audit trail names for a change made offline with this command.
CLI_WHO = "(dtucenter cli)"


def _owner(session: Session, account: str | None) -> int:
    return accounts.first_admin_id(session) if account is None else accounts.account_id(session, account)


def _stored_catalog(session: Session, owner: int) -> TemplateCatalog:
    """The templates ``owner``'s meters may be made from, as the center loads them at start."""
    catalog = TemplateCatalog()
    for row in stored_templates.list_templates(session, owner):
        catalog.put(owner, read_template(json.loads(row.document), f"database: template {row.name!r}"))
    return catalog


def cmd_template_add(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    """As ``POST`` or ``PUT /api/templates``: the meters made from a replaced template get its
    new points in the database; the center polls them so from its next start."""
    try:
        with open(args.file, "rb") as f:
            content = f.read()
    except OSError as e:
        raise CommandError(f"{args.file}: cannot read: {e.strerror}") from None
    try:
        template = parse_template(content, args.file)
        document = json.dumps(tomllib.loads(content.decode()))
        owner = _owner(session, args.account)
        catalog = _stored_catalog(session, owner)
        replacing = template.name in catalog.own(owner)
        catalog.put(owner, template)
        now = dt.datetime.now(dt.UTC)
        if not replacing:
            stored_templates.create_template(session, owner, template.name, template.version, document, CLI_WHO, now)
            print(f"added template {template.name} (usable from the center's next start)", file=out)
            return
        points = {
            name: meter_spec(read_meter_definition(json.loads(definition), f"meter {name!r}", catalog.finder(owner)))
            ["points"] for name, definition in stored_templates.meters_using(session, owner, template.name)
        }
        stored_templates.replace_template(
            session, owner, template.name, template.version, document, CLI_WHO, now, points
        )
    except (ConfigError, ValueError) as e:  # AccountError and DeviceConflict among them; a shipped name
        raise CommandError(str(e)) from None
    print(f"replaced template {template.name} with version {template.version}"
          f"{' and the points of ' + ', '.join(points) if points else ''} (polled so from the center's next start)",
          file=out)


def cmd_template_remove(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        found = stored_templates.delete_template(
            session, _owner(session, args.account), args.name, CLI_WHO, dt.datetime.now(dt.UTC)
        )
    except ValueError as e:  # AccountError, DeviceConflict
        raise CommandError(str(e)) from None
    if not found:
        raise CommandError(f"no template {args.name!r}")
    print(f"removed template {args.name}", file=out)


# -- links and meters ----------------------------------------------------------------------------


def cmd_device_add(kind: str, session: Session, args: argparse.Namespace, out: TextIO) -> None:
    """Checked by the file's reader, and a meter's scada_unit against the stored meters'; how it
    goes with the other links (a registration that cannot be told apart) is the running
    bridge's to check, at the next start."""
    try:
        table = json.loads(args.definition)
        owner = _owner(session, args.account)
        now = dt.datetime.now(dt.UTC)
        if kind == "link":
            link = read_link_definition(table, "the definition")
            device_links.create_link(session, link_spec(link), owner, now)
            name = link.name
        else:
            settings = read_meter_definition(table, "the definition", _stored_catalog(session, owner).finder(owner))
            if device_links.get_link(session, settings.link) is None:
                raise CommandError(f"meter {settings.name!r}: no link named {settings.link!r}")
            _check_scada_unit(session, settings.name, settings.scada_unit)
            meters.create_meter(session, meter_spec(settings), owner, now)
            name = settings.name
    except json.JSONDecodeError as e:
        raise CommandError(f"the definition is not JSON: {e}") from None
    except (ConfigError, ValueError) as e:  # AccountError and DeviceConflict among them
        raise CommandError(str(e)) from None
    print(f"added {kind} {name} (served from the center's next start)", file=out)


def _check_scada_unit(session: Session, name: str, unit: int | None) -> None:
    """A scada_unit a stored meter answers SCADA under is taken (as the running bridge would say)."""
    for meter in meters.list_meters(session):
        if unit is not None and meter.configured and meter.name != name and (meter.definition or {}).get(
            "scada_unit"
        ) == unit:
            raise CommandError(f"meter {name!r}: scada_unit {unit} is already the scada_unit of meter {meter.name!r}")


def cmd_device_list(kind: str, session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        owner = None if args.account is None else accounts.account_id(session, args.account)
    except accounts.AccountError as e:
        raise CommandError(str(e)) from None
    if kind == "link":
        found = [{"name": row.name, "account": row.account, "managed_by": row.managed_by,
                  "definition": json.loads(row.definition)} for row in device_links.list_links(session, owner)]
    else:
        found = [{"name": info.name, "account": info.account, "managed_by": info.managed_by,
                  "definition": info.definition} for info in meters.list_meters(session, owner) if info.configured]
    if args.json:
        json.dump({f"{kind}s": found}, out, indent=2)
        out.write("\n")
        return
    rows = [("NAME", "ACCOUNT", "MANAGED BY", "DEFINITION")]
    rows += [(d["name"], d["account"], d["managed_by"], json.dumps(d["definition"])) for d in found]
    _print_table(rows, out)


def cmd_device_remove(kind: str, session: Session, args: argparse.Namespace, out: TextIO) -> None:
    try:
        if kind == "link":
            found = device_links.delete_link(session, args.name, None, CONFIG_FILE)
            stopped = meters.retire_link_meters(session, args.name) if found else []
        else:
            found, stopped = meters.delete_meter(session, args.name, None, CONFIG_FILE), []
    except device_links.DeviceConflict as e:
        raise CommandError(str(e)) from None
    if not found:
        raise CommandError(f"no {kind} {args.name!r}")
    also = f" and its meters {', '.join(stopped)}" if stopped else ""
    print(f"removed {kind} {args.name}{also} (stopped at the center's next start)", file=out)


# -- pending devices --------------------------------------------------------------------------------


def cmd_pending_list(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    devices = [device_json(device) for device in pending_rows.list_pending(session)]
    if args.json:
        json.dump({"pending": devices}, out, indent=2)
        out.write("\n")
        return
    rows = [("ID", "KIND", "REGISTRATION", "PEER", "FIRST SEEN", "LAST SEEN", "TIMES")]
    rows += [(d["id"], d["kind"], d["registration"], d["peer"], d["first_seen"], d["last_seen"], str(d["times_seen"]))
             for d in devices]
    _print_table(rows, out)


def _pending_device(session: Session, device_id: str) -> PendingDevice:
    device = pending_rows.get_pending(session, device_id)
    if device is None:
        raise CommandError(f"no pending device {device_id!r}")
    return device


def cmd_pending_adopt(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    device = _pending_device(session, args.id)
    now = dt.datetime.now(dt.UTC)
    try:
        if device.kind == DTU:
            if args.template is not None:
                raise CommandError("a binary-protocol DTU is adopted into an account only: no --template")
            record_dtu_adoption(session, queries.enrol_adopted_dtu, int(device.registration), args.account,
                                device.id, "cli", now)
            made = f"DTU {int(device.registration)}"
        else:
            owner = owner_id(session, args.account)
            link, meter = definitions(device.registration, args.template, args.unit, args.interval, {},
                                      read_link_definition, read_meter_definition,
                                      _stored_catalog(session, owner).finder(owner))
            record_link_adoption(session, link, meter, owner, device.id, "cli", now)
            made = f"link {link.name}" + ("" if meter is None else f" with meter {meter.name}")
    except AdoptionRefused as e:
        raise CommandError(str(e)) from None
    print(f"adopted {made} (served from the center's next start)", file=out)


def cmd_pending_drop(session: Session, args: argparse.Namespace, out: TextIO) -> None:
    pending_rows.delete_pending(session, _pending_device(session, args.id).id)
    print(f"dropped pending device {args.id}", file=out)
