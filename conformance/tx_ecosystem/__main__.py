"""`python -m conformance.tx_ecosystem BASE_URL --tests DIR --out DIR`: run and report."""

from __future__ import annotations

import argparse
from pathlib import Path

from conformance.shared_data import shared_data
from conformance.tx_ecosystem.runner import run, write_reports

SHARED = shared_data()
DEFAULT_TESTS = SHARED / "tx-ecosystem" if SHARED else Path("tx-ecosystem")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url", help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument("--tests", type=Path, default=DEFAULT_TESTS, help="folder holding test-cases.json")
    parser.add_argument("--out", type=Path, default=Path("tx-ecosystem-report"), help="folder for the JSON and HTML reports")
    parser.add_argument("--modes", default="flat", help="comma-separated modes (default: flat)")
    parser.add_argument("--filter", default=None, help="run only tests whose name contains this")
    args = parser.parse_args()
    report = run(args.base_url, args.tests, set(filter(None, args.modes.split(","))), args.filter)
    write_reports(report, args.out)
    print(f"{report.passed} of {len(report.counted)} passed ({report.rate:.1%}); reports in {args.out}")


if __name__ == "__main__":
    main()
