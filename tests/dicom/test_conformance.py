"""The committed DICOM conformance statement is exactly what the code's lists produce."""

from pathlib import Path

from conformance.dicom_statement import statement

STATEMENT = Path(__file__).resolve().parents[2] / "conformance" / "dicom-conformance-statement.md"


def test_statement_is_generated_from_the_code():
    assert STATEMENT.read_text() == statement(), (
        "regenerate: python -m conformance.dicom_statement > conformance/dicom-conformance-statement.md"
    )
