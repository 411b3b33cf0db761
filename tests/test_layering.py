"""The dependency directions of docs/architecture.md, read from the source.

Every module's imports are collected with ``ast`` (also those inside
functions, methods and ``if TYPE_CHECKING:`` blocks: a type-only import is
still a dependency), and the rules below are checked against them. Nothing is
imported, so a module that would fail to import is still checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: What ``dtucenter/store/`` may import from the Modbus half: the records its
#: MeterRecorder is configured with and that ``modbus.poller.MeterSink`` hands it,
#: by name. Nothing else: no codec, framing, link or poller code.
STORE_MAY_IMPORT_FROM_MODBUS = {
    "dtucenter.modbus.config": {"LinkSettings", "MeterSettings", "ModbusSettings"},
    "dtucenter.modbus.points": {"Point", "Value"},
}

#: Packages (or top-level modules) and what they must not import, with why.
FORBIDDEN = [
    ("dtucenter.store", "dtucenter.dtu", "the store implements the DTU half's interfaces without importing it"),
    ("dtucenter.dtu", "dtucenter.store", "the DTU half speaks to the store only through dtu/ports.py"),
    ("dtucenter.modbus", "dtucenter.store", "the Modbus half speaks to the store only through MeterSink"),
    ("dtucenter.dtu", "dtucenter.web", "protocols do not know the API"),
    ("dtucenter.modbus", "dtucenter.web", "protocols do not know the API"),
    ("dtucenter.store", "dtucenter.web", "the store does not know the API"),
    ("dtucenter.dtu", "dtucenter.config", "protocols get their settings passed in"),
    ("dtucenter.modbus", "dtucenter.config", "protocols get their settings passed in"),
    ("dtucenter.store", "dtucenter.config", "the store gets its settings passed in"),
    ("dtucenter.dtu", "dtucenter.tap", "only the twisted plugin starts the center"),
    ("dtucenter.modbus", "dtucenter.tap", "only the twisted plugin starts the center"),
    ("dtucenter.web", "dtucenter.tap", "only the twisted plugin starts the center"),
    ("dtucenter.mqtt", "dtucenter.store", "the MQTT publisher speaks to the store only through its Backlog interface"),
    ("dtucenter.mqtt", "dtucenter.dtu", "integrations hear the protocols through the event hub"),
    ("dtucenter.mqtt", "dtucenter.modbus", "integrations hear the protocols through the event hub"),
    ("dtucenter.mqtt", "dtucenter.web", "the publisher does not know the API"),
    ("dtucenter.mqtt", "dtucenter.config", "the publisher gets its settings passed in"),
    ("dtucenter.mqtt", "dtucenter.tap", "only the twisted plugin starts the center"),
    ("dtucenter.store", "dtucenter.mqtt", "the store implements the publisher's Backlog without importing it"),
    ("dtucenter.dtu", "dtucenter.alarms", "alarms hear the protocols through the event hub"),
    ("dtucenter.modbus", "dtucenter.alarms", "alarms hear the protocols through the event hub"),
    ("dtucenter.store", "dtucenter.alarms", "the store keeps alarms as plain rows"),
    ("dtucenter.alarms", "dtucenter.web", "alarms do not know the API"),
    ("dtucenter.alarms", "dtucenter.tap", "only the twisted plugin starts the center"),
]

#: Helpers every layer may use; they use none.
LEAVES = (
    "dtucenter.isotime", "dtucenter.addresses", "dtucenter.throttle", "dtucenter.latency", "dtucenter.junk",
    "dtucenter.setting", "dtucenter.transports", "dtucenter.events", "dtucenter.discovery",
)

#: Sans-IO: the DTU wire format is shared with the simulator and tools.
SANS_IO = {"dtucenter.dtu.wire": ("twisted", "sqlalchemy")}


@attrs.frozen
class Import:
    importer: str  # module name
    target: str  # the module imported (a name imported from it resolved to a submodule when it is one)
    names: tuple[str, ...]  # names taken ``from`` it; () for a plain ``import``
    line: int

    @property
    def reaches(self) -> tuple[str, ...]:
        """The target, and ``target.name`` for each name: a name may be a module not in the list read."""
        return (self.target, *(f"{self.target}.{name}" for name in self.names))

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else f"import {self.target}"
        return f"{self.importer}:{self.line}: {what}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Every module of the product: the package, the twisted plugin, the benchmarks (not the tests)."""
    files = [*ROOT.glob("dtucenter/**/*.py"), *ROOT.glob("twisted/plugins/*.py"), *ROOT.glob("benchmarks/*.py")]
    return {module_name(path): path for path in sorted(files)}


def imports_of(module: str, source: str, modules: Iterable[str], is_package: bool = False) -> Iterator[Import]:
    """Every import statement anywhere in ``source``, resolved to module names."""
    known = set(modules)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            plain = []
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield Import(module, submodule, (), node.lineno)
                else:
                    plain.append(alias.name)
            if plain:
                yield Import(module, base, tuple(plain), node.lineno)


def all_imports() -> list[Import]:
    files = source_files()
    found: list[Import] = []
    for module, path in files.items():
        found.extend(imports_of(module, path.read_text(), files, is_package=path.name == "__init__.py"))
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str:
    """``dtucenter.dtu.center`` -> ``dtucenter.dtu``; a top-level module is its own layer."""
    parts = module.split(".")
    return ".".join(parts[:2])


def violations(found: Iterable[Import]) -> list[str]:
    problems = []
    for imp in found:
        if not within(imp.target, "dtucenter") and not any(within(imp.importer, m) for m in SANS_IO):
            continue
        for importer, target, why in FORBIDDEN:
            if within(imp.importer, importer) and any(within(t, target) for t in imp.reaches):
                problems.append(f"{imp}  ({why})")
        if within(imp.importer, "dtucenter.store") and within(imp.target, "dtucenter.modbus"):
            allowed = STORE_MAY_IMPORT_FROM_MODBUS.get(imp.target, set())
            if not imp.names or not set(imp.names) <= allowed:
                problems.append(f"{imp}  (the store takes only Modbus records, never its codecs: {sorted(allowed)})")
        if any(within(t, "dtucenter.tap") for t in imp.reaches) and not within(imp.importer, "twisted.plugins"):
            problems.append(f"{imp}  (nothing but the twisted plugin starts the center)")
        if imp.importer in LEAVES and within(imp.target, "dtucenter"):
            problems.append(f"{imp}  (a leaf helper imports nothing from dtucenter)")
        for module, libraries in SANS_IO.items():
            if imp.importer == module and any(within(imp.target, lib) for lib in libraries):
                problems.append(f"{imp}  (sans-IO: no I/O library)")
    return problems


def layer_cycles(found: Iterable[Import]) -> list[list[str]]:
    """Cycles between layers (packages and top-level modules of dtucenter), each as a path."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        if within(imp.importer, "dtucenter") and within(imp.target, "dtucenter"):
            source, target = layer_of(imp.importer), layer_of(imp.target)
            if source != target and target != "dtucenter":
                edges.setdefault(source, set()).add(target)
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for target in sorted(edges.get(path[-1], ())):
            if target == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    cycles.append([*path, target])
            elif target not in path and target > path[0]:  # each cycle once, from its smallest layer
                walk([*path, target])

    for start in sorted(edges):
        walk([start])
    return cycles


# -- the rules hold -----------------------------------------------------------------------------


def test_every_module_is_read() -> None:
    files = source_files()
    assert "dtucenter.dtu.center" in files and "dtucenter.store.facade" in files and "dtucenter.tap" in files
    assert any(within(m, "twisted.plugins") for m in files)


def test_dependencies_point_the_documented_way() -> None:
    problems = violations(all_imports())
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_no_cycles_between_packages() -> None:
    cycles = layer_cycles(all_imports())
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c) for c in cycles)


# -- and the checks can fail --------------------------------------------------------------------

MODULES = ["dtucenter.dtu", "dtucenter.dtu.wire", "dtucenter.dtu.center", "dtucenter.store", "dtucenter.store.queries"]


def check(module: str, source: str) -> list[str]:
    return violations(imports_of(module, source, MODULES))


@pytest.mark.parametrize(
    "source",
    [
        "from dtucenter.dtu import wire",
        "import dtucenter.dtu.wire",
        "def f():\n    from dtucenter.dtu.wire import Register\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dtucenter.dtu.center import DTUCenter\n",
        "from ..dtu import wire",
        "from dtucenter.modbus.points import decode_registers",
        "from dtucenter.modbus.framing import RtuFramer",
        "import dtucenter.modbus.points",
    ],
)
def test_store_importing_a_protocol_is_found_wherever_it_hides(source: str) -> None:
    assert check("dtucenter.store.queries", source)


def test_store_may_take_modbus_records() -> None:
    assert check("dtucenter.store.recorder", "from dtucenter.modbus.points import Point, Value") == []


def test_protocols_importing_the_store_or_the_entry_point_are_found() -> None:
    assert check("dtucenter.dtu.center", "class C:\n    def m(self):\n        from dtucenter.store import queries\n")
    assert check("dtucenter.modbus.poller", "from dtucenter.config import Settings")
    assert check("dtucenter.web.status", "from dtucenter import tap")
    assert check("dtucenter.dtu.wire", "from twisted.internet import reactor")
    assert check("dtucenter.isotime", "from dtucenter.dtu.wire import Register")


def test_a_cycle_between_packages_is_found() -> None:
    found = [
        *imports_of("dtucenter.dtu.center", "from dtucenter.store import queries", MODULES),
        *imports_of("dtucenter.store.queries", "from dtucenter.dtu import wire", MODULES),
    ]
    assert layer_cycles(found) == [["dtucenter.dtu", "dtucenter.store", "dtucenter.dtu"]]
