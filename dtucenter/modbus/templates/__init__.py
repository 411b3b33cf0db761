"""Meter templates: named, versioned point lists for meter models.

A template is a TOML document in the shape of a config file's ``[[meter]]``
points, with what it describes on top::

    name = "eastron-sdm120"
    version = 1
    description = "..."
    manufacturer = "Eastron"
    model = "SDM120-Modbus"
    source = "the public register map it follows, and where it was checked"

    [[point]]
    name = "voltage"
    table = "input"
    address = 0x0000
    type = "float32"
    unit = "V"

The templates the center ships are the ``*.toml`` files beside this module,
each named after its file. A template's points are read by the same reader as
a config file's (``points.read_points``): the same keys, rules and one-line
messages, naming the template file and the point.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed

from dtucenter.modbus.points import Point, read_points
from dtucenter.setting import (
    MAX_NAME,
    ConfigError,
    Place,
    build,
    integer,
    read_keys,
    read_table,
    setting,
    text,
)

#: Template names go into URLs (``/api/templates/{name}``) and file names.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


def template_name(value: Any) -> str:
    """A template's name: lower-case letters, digits and dashes, starting with a letter or digit."""
    name = text(value)
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise ValueError(
            f"must be lower-case letters, digits and dashes (at most {MAX_NAME}), got {name!r}"
        )
    return name


@attrs.frozen
class Template:
    """A meter model's points, and what they were taken from."""

    name: str = attrs.field(metadata=setting(template_name, "The template's name, as meters name it."))
    version: int = attrs.field(
        metadata=setting(integer(1, 1_000_000), "Raised whenever the points change.")
    )
    description: str = attrs.field(metadata=setting(text, "What the template reads, for people."))
    manufacturer: str = attrs.field(metadata=setting(text, "Who makes the meter."))
    model: str = attrs.field(metadata=setting(text, "The meter model (or family) the points are for."))
    source: str = attrs.field(
        metadata=setting(text, "The public register map the points follow: document, version, where checked.")
    )
    points: tuple[Point, ...]

    def summary(self) -> dict[str, str | int]:
        """What a list of templates shows of each: all but the points, and how many there are."""
        return {
            "name": self.name, "version": self.version, "description": self.description,
            "manufacturer": self.manufacturer, "model": self.model, "source": self.source,
            "points": len(self.points),
        }


def read_template(document: Mapping[str, Any], source: str) -> Template:
    """A template from a loaded TOML document; ``source`` names it in messages (its file)."""
    place = Place(source)
    data = dict(read_table(document, place))
    point_tables = data.pop("point", None)
    (values,) = read_keys(data, place, Template)
    points = read_points(point_tables, place)
    if not points:
        raise place.error("point", "a template needs at least one [[point]]")
    return build(Template, values, place, points=points)


def parse_template(content: bytes | str, source: str) -> Template:
    """A template from the contents of a TOML file."""
    try:
        document = tomllib.loads(content.decode() if isinstance(content, bytes) else content)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return read_template(document, source)


def _shipped_files() -> dict[str, Traversable]:
    files = (entry for entry in resources.files(__name__).iterdir() if entry.name.endswith(".toml"))
    return {entry.name.removesuffix(".toml"): entry for entry in sorted(files, key=lambda entry: entry.name)}


@functools.cache
def shipped_templates() -> Mapping[str, Template]:
    """The templates shipped with the center, by name (read once: they are package data)."""
    found = {}
    for name, entry in _shipped_files().items():
        source = f"{__name__.replace('.', '/')}/{entry.name}"
        template = parse_template(entry.read_bytes(), source)
        if template.name != name:
            raise ConfigError(source, "name", f"must be the file's name, {name!r}")
        found[name] = template
    return MappingProxyType(found)


def shipped_template_text(name: str) -> str:
    """The file of the shipped template ``name`` as written, comments and all: a start for one's own.

    ``LookupError`` says which exist.
    """
    find_template(name)
    return _shipped_files()[name].read_text(encoding="utf-8")


def find_template(name: str) -> Template:
    """The shipped template ``name``; ``LookupError`` says which exist."""
    return _find(name, shipped_templates())


def _find(name: str, templates: Mapping[str, Template]) -> Template:
    if name not in templates:
        raise LookupError(f"no template named {name!r} (templates: {', '.join(templates)})")
    return templates[name]


#: What a meter reader resolves a template name with: the template, or ``LookupError``
#: saying which exist (``find_template`` for the shipped ones, ``TemplateCatalog.finder``).
TemplateFinder = Callable[[str], Template]


class TemplateCatalog:
    """The templates meters may be made from: the shipped ones, for every account, and each
    account's own (``put`` by whoever loads or writes them; here only held).

    The one place a meter's template name is resolved: against its own account's templates,
    then the shipped ones. Another account's template is not found, as an unknown one is.
    Accounts are the keys the caller owns them by (the store's account ids); this module
    knows nothing else of them.

    The center fills it from the database at start, after the API starts listening, and
    marks it loaded once the links and meters stored with it are served too: writers that
    depend on either await :meth:`loaded` first, so that a request in the first moments
    neither misses an account's template nor races the loading.
    """

    def __init__(self, shipped: Mapping[str, Template] | None = None) -> None:
        self.shipped = shipped_templates() if shipped is None else shipped
        self._own: dict[int, dict[str, Template]] = {}
        self._loaded = False
        self._waiting: list[Deferred[None]] = []

    def loaded(self) -> Deferred[None]:
        """Fires once :meth:`finish_loading` has been called (at once if it has)."""
        if self._loaded:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def finish_loading(self) -> None:
        """The stored templates are in (or could not be read: then the loader logged why)."""
        self._loaded = True
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(None)

    def own(self, account: int) -> Mapping[str, Template]:
        """The account's own templates, by name."""
        return MappingProxyType(self._own.get(account, {}))

    def available(self, account: int) -> Mapping[str, Template]:
        """What the account's meters may name: the shipped templates, then its own."""
        return {**self.shipped, **self._own.get(account, {})}

    def find(self, account: int, name: str) -> Template:
        """The template ``name`` for a meter of ``account``; ``LookupError`` names those it may use."""
        return _find(name, self.available(account))

    def finder(self, account: int) -> TemplateFinder:
        """``find`` for one account, as the meter readers take it."""
        return functools.partial(self.find, account)

    def put(self, account: int, template: Template) -> None:
        """Add or replace one of the account's own templates (its name is never a shipped one)."""
        if template.name in self.shipped:
            raise ValueError(f"template {template.name!r} is shipped with the center")
        self._own.setdefault(account, {})[template.name] = template

    def remove(self, account: int, name: str) -> None:
        own = self._own.get(account, {})
        own.pop(name, None)
        if not own:
            self._own.pop(account, None)
