"""Bytes as received: numbers keep their lexical form through parse and serialize."""

from __future__ import annotations

import pytest

from server.fhir import jsonio
from server.fhir.outcome import FhirError


@pytest.mark.parametrize(
    "number",
    [b"1.50", b"72.5", b"0.1", b"100.0", b"1e3", b"1E-7", b"1.0e-5", b"-0.0", b"3.14159265358979323846264",
     b"12345678901234567890123", b"0", b"-2.50E+10"],
)
def test_numbers_round_trip(number):
    body = b'{"a":[' + number + b'],"b":{"c":' + number + b"}}"
    assert jsonio.dumps(jsonio.parse(body)) == body


def test_decimal_like_text_in_strings_does_not_change_strings():
    body = '{"text":"dose 1.50 mg","n":2.5,"name":"Müller 東京"}'.encode()
    assert jsonio.dumps(jsonio.parse(body)) == body


def test_whitespace_and_escapes():
    assert jsonio.dumps(jsonio.parse(b'{ "a" : [ 1 , 2 ],\n "b": "\\u00e9\\n" }')) == '{"a":[1,2],"b":"é\\n"}'.encode()


def test_invalid_inputs():
    for body in (b"", b"  ", b"{", b'{"a":NaN}', b"\xff", b'{"a":1}x', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(FhirError) as failure:
            jsonio.parse(body)
        assert failure.value.status == 400
    with pytest.raises(FhirError):
        jsonio.dumps(jsonio.parse(b'{"a":"\\ud800"}'))


def test_pretty_keeps_numbers():
    assert jsonio.pretty(b'{"a":1.50}') == b'{\n  "a": 1.50\n}\n'


def test_one_inexact_decimal_keeps_every_number_exact():
    body = b'{"a":72.5,"b":[1.50,3],"c":{"d":0.25,"e":12345678901234567890}}'
    assert jsonio.dumps(jsonio.parse(body)) == body
    assert isinstance(jsonio.parse(b'{"a":72.5,"b":3}')["a"], float)  # the common case stays float
