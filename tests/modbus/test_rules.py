"""Registration rules: matching families of registrations, bounded, and the ``[[rule]]`` table."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtucenter.config import ConfigError, read_settings
from dtucenter.modbus.rules import (
    MAX_RULE_REGISTRATION,
    RegistrationRule,
    first_matching_rule,
    registration_match,
    registration_name,
)
from dtucenter.setting import MAX_NAME

IMEI = registration_match("regex:^[0-9]{15}$")


def rule(match: str, template: str = "eastron-sdm120") -> RegistrationRule:
    return RegistrationRule(registration_match(match), template)


@pytest.mark.parametrize(
    ("registration", "expected"),
    [
        (b"861234567890123", True),
        (b"86123456789012", False),  # 14 digits
        (b"8612345678901234", False),  # 16
        (b"861234567890123\n", False),  # $ may match before a final newline; the whole must match
        (b"86123456789O123", False),
        ("861234567890\uff11\uff12\uff13".encode(), False),  # full-width digits are not \d in ASCII mode
    ],
)
def test_an_imei_rule_matches_exactly_15_digits(registration: bytes, expected: bool) -> None:
    assert IMEI.matches(registration) is expected


def test_a_regex_must_match_the_whole_registration() -> None:
    digits = registration_match("regex:[0-9]{4}")
    assert digits.matches(b"1234") and not digits.matches(b"12345") and not digits.matches(b"x1234")


def test_a_prefix_rule_matches_its_family_by_text_or_hex() -> None:
    site = registration_match("prefix:SITE-")
    assert site.matches(b"SITE-0042") and site.matches(b"SITE-") and not site.matches(b"site-0042")
    binary = registration_match("prefix:hex:FE01")
    assert binary.matches(b"\xfe\x01\x00\x07") and not binary.matches(b"\xfe\x02")


def test_rules_apply_in_order_and_unknown_families_match_none() -> None:
    rules = [rule("prefix:8612"), rule("regex:^[0-9]{15}$", "eastron-sdm630")]
    assert first_matching_rule(rules, b"861234567890123") is rules[0]
    assert first_matching_rule(rules, b"351234567890123") is rules[1]
    assert first_matching_rule(rules, b"DTU-0001") is None
    assert first_matching_rule([], b"861234567890123") is None


@given(st.binary(min_size=MAX_RULE_REGISTRATION + 1, max_size=4 * MAX_RULE_REGISTRATION))
def test_a_registration_longer_than_the_cap_matches_no_rule(registration: bytes) -> None:
    anything = [rule("regex:(?s).*"), rule("prefix:" + "hex:" + registration[:4].hex())]
    assert first_matching_rule(anything, registration) is None
    assert first_matching_rule(anything, registration[:MAX_RULE_REGISTRATION]) is anything[0]


@given(st.binary(min_size=1, max_size=MAX_RULE_REGISTRATION))
def test_the_name_of_a_registration_fits_and_tells_registrations_apart(registration: bytes) -> None:
    name = registration_name(registration)
    assert len(name) <= MAX_NAME
    if name.startswith("hex:"):
        assert bytes.fromhex(name[4:]) == registration
    else:
        assert name.encode() == registration


def test_registration_names() -> None:
    assert registration_name(b"861234567890123") == "861234567890123"
    assert registration_name(b"\x00\x01AB") == "hex:00014142"
    assert registration_name(b" padded ") == "hex:2070616464656420"
    assert registration_name(b"hex:00") == "hex:6865783A3030"  # as "hex:00" it would be b"\x00"'s name


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("imei", 'must be "prefix:..." or "regex:...", got \'imei\''),
        ("regex:", 'must be "prefix:..." or "regex:...", got \'regex:\''),
        (15, 'must be "prefix:..." or "regex:...", got 15'),
        ("regex:[0-9", "not a regular expression: unterminated character set at position 0"),
        ("prefix:hex:XY", "'hex:XY' is not valid hex after 'hex:'"),
        ("prefix:" + "x" * 49, "the prefix is 49 bytes, longer than any registration a rule matches (48)"),
    ],
)
def test_bad_matches_say_why(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        registration_match(value)
    assert str(caught.value) == message


# -- the [[rule]] table -------------------------------------------------------------------------------

LISTEN = '[modbus]\nlisten = "tcp:0"\n'


def test_rules_are_read_in_file_order() -> None:
    document = tomllib.loads(LISTEN + """
[[rule]]
match = "regex:^[0-9]{15}$"
template = "eastron-sdm120"
interval = 60

[[rule]]
match = "prefix:PLANT-"
template = "eastron-sdm630"
unit = 2
protocol = "tcp"
""")
    imei, plant = read_settings(document).modbus.rules
    assert (imei.match.written, imei.template, imei.unit, imei.interval, imei.protocol) == (
        "regex:^[0-9]{15}$", "eastron-sdm120", 1, 60.0, "rtu"
    )
    assert (plant.match.prefix, plant.template, plant.unit, plant.protocol) == (b"PLANT-", "eastron-sdm630", 2, "tcp")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (LISTEN + '[[rule]]\nmatch = "prefix:A"\n', "c.toml: rule[0]: template: is required"),
        (LISTEN + '[[rule]]\ntemplate = "eastron-sdm120"\n', "c.toml: rule[0]: match: is required"),
        (LISTEN + '[[rule]]\nmatch = "regex:("\ntemplate = "eastron-sdm120"\n',
         "c.toml: rule[0]: match: not a regular expression: missing ), unterminated subpattern at position 0"),
        (LISTEN + '[[rule]]\nmatch = "prefix:A"\ntemplate = "sdm120"\n',
         (
             "c.toml: rule[0]: template: no template named 'sdm120'"
             " (templates: eastron-sdm120, eastron-sdm630, generic-energy-meter)"
         )),
        (LISTEN + '[[rule]]\nmatch = "prefix:A"\ntemplate = "eastron-sdm120"\nunit = 0\n',
         "c.toml: rule[0]: unit: an rtu unit id is 1..247, got 0"),
        (LISTEN + '[[rule]]\nmatch = "prefix:A"\ntemplate = "eastron-sdm120"\nname = "x"\n',
         "c.toml: rule[0]: name: unknown key (a typo?)"),
        ('[[rule]]\nmatch = "prefix:A"\ntemplate = "eastron-sdm120"\n',
         "c.toml: rule[0]: applies to DTUs that dial the shared listener: set [modbus] listen (or --modbus)"),
    ],
)
def test_rule_mistakes_are_one_line(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_settings(tomllib.loads(toml), source="c.toml")
    assert str(caught.value) == message
