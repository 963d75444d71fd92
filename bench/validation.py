"""Validation cost per resource: the R4 validator and fhir.resources, on Synthea data.

Ingest must reach 2,500 resources/s and validation is most of its cost, so this prints,
per resource type and overall, the microseconds each validator spends on one resource of
the Synthea transaction bundles (`synthea -p 10 -s 42`, about 23,000 resources), and
their ratio. Each figure is the best of several passes (the least disturbed by other
load on the machine). It checks nothing; the tests do.

    python bench/validation.py [--synthea-dir DIR] [--passes 3]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.fhir import jsonio, r4validator
from server.fhir.validation import fhir_resources_issues


def synthea_resources(directory: Path | None) -> list[dict[str, Any]]:
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="kuroshio-synthea-"))
        synthea = shutil.which("synthea") or str(Path(sys.executable).with_name("synthea"))
        subprocess.run([synthea, "-p", "10", "-s", "42", "-o", str(directory)], check=True, capture_output=True)
    resources = []
    for path in sorted(directory.glob("fhir/*.json")):
        bundle = jsonio.parse(path.read_bytes())
        resources += [entry["resource"] for entry in bundle["entry"]]
    return resources


def best_times(resources: list[dict[str, Any]], validate: Callable[[dict[str, Any]], Any], passes: int) -> dict[str, float]:
    """Seconds per resource type: the fastest of `passes` runs over all resources."""
    best: dict[str, float] = defaultdict(lambda: float("inf"))
    clock = time.perf_counter
    gc.disable()
    try:
        for _ in range(passes):
            spent: dict[str, float] = defaultdict(float)
            for resource in resources:
                start = clock()
                validate(resource)
                spent[resource["resourceType"]] += clock() - start
            for type_, seconds in spent.items():
                best[type_] = min(best[type_], seconds)
    finally:
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthea-dir", type=Path, help="output of `synthea -p 10 -s 42 -o DIR`")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    resources = synthea_resources(args.synthea_dir)
    counts: dict[str, int] = defaultdict(int)
    for resource in resources:
        counts[resource["resourceType"]] += 1
    r4 = best_times(resources, r4validator.validate, args.passes)
    library = best_times(resources, fhir_resources_issues, args.passes)

    print(f"{len(resources)} Synthea resources, best of {args.passes} passes, microseconds per resource")
    print(f"{'type':<28}{'count':>7}{'R4 validator':>14}{'fhir.resources':>16}{'ratio':>8}")
    for type_ in sorted(counts, key=lambda t: -counts[t]):
        mine, theirs = r4[type_] / counts[type_] * 1e6, library[type_] / counts[type_] * 1e6
        print(f"{type_:<28}{counts[type_]:>7}{mine:>14.1f}{theirs:>16.1f}{theirs / mine:>7.1f}x")
    mine, theirs = sum(r4.values()) / len(resources) * 1e6, sum(library.values()) / len(resources) * 1e6
    print(f"{'all':<28}{len(resources):>7}{mine:>14.1f}{theirs:>16.1f}{theirs / mine:>7.1f}x")
    print(f"validation alone allows: R4 validator {1e6 / mine:,.0f}/s, both (as shipped) {1e6 / (mine + theirs):,.0f}/s")


if __name__ == "__main__":
    main()
