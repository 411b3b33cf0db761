"""docs/modbus.md lists the shipped templates' points; this keeps the list true.

On a mismatch the assertion shows the section as it must read: paste it between the markers.
"""

from __future__ import annotations

from pathlib import Path

from dtucenter.modbus.templates import Template, shipped_templates

DOC = Path(__file__).resolve().parents[2] / "docs" / "modbus.md"
BEGIN = "<!-- shipped templates: generated from dtucenter/modbus/templates/*.toml, checked by a test -->\n"
END = "<!-- end of shipped templates -->\n"


def render(template: Template) -> str:
    lines = [
        f"#### `{template.name}` (version {template.version})",
        "",
        f"{template.description}. {template.manufacturer}, {template.model}.",
        "",
        "| point | table | address | type | scale | unit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for point in template.points:
        lines.append(
            f"| `{point.name}` | {point.table.value} | {point.address} (0x{point.address:04X}) | {point.type.value}"
            f" | {point.scale:g} | {point.unit or ''} |"
        )
    return "\n".join(lines) + "\n"


def expected_section() -> str:
    return "\n".join(render(template) for template in shipped_templates().values())


def test_the_doc_lists_every_shipped_templates_points() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"docs/modbus.md needs the markers {BEGIN!r} and {END!r}"
    documented = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"
    expected = expected_section()
    assert documented == expected, "docs/modbus.md's shipped templates must read:\n\n" + expected
