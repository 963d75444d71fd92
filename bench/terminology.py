"""Terminology benchmark: load times, and latency / throughput of the operations.

Starts its own embedded mongod and `kuroshio serve`, loads the LOINC subset and the
SNOMED CT Global Patient Set (timed), then measures over HTTP:
- CodeSystem/$lookup (LOINC), ValueSet/$validate-code (LOINC implicit value set),
  ConceptMap/$translate (hospital table -> LOINC): p50, p95, requests/s;
- ValueSet/$expand with a text filter over the GPS (~26,000 SNOMED CT concepts).
Targets (issue 5): p50 <= 3 ms for lookup/validate/translate, <= 50 ms for the filtered
expand. With `--peer URL` the same requests go to another FHIR terminology server that
already holds LOINC, the GPS and the hospital map, and the ratios are printed.

With `--snomed-scale N` it also writes a synthetic RF2 snapshot of N concepts (four
descriptions each, a random is-a hierarchy, the exact RF2 column layout) and times its
load and the loader's peak memory: a full International Edition is ~370,000 concepts
and ~1.5M descriptions.

Usage: python bench/terminology.py [--requests 300] [--peer http://host/fhir] [--snomed-scale 370000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conformance.shared_data import shared_data as find_shared_data  # noqa: E402
from server.config import Settings  # noqa: E402
from server.store.database import Store  # noqa: E402
from server.store.mongod import EmbeddedMongod, free_port  # noqa: E402

HOSPITAL = "http://hospital.example.org/fhir/CodeSystem/lab"
TABLE = ROOT / "tests" / "terminology" / "fixtures" / "hospital-lab-codes.csv"
DATABASE = "kuroshio_bench"


def shared_data() -> Path:
    found = find_shared_data()
    if found is None:
        raise SystemExit("shared/data (LOINC subset) not found beside the repository")
    return found


def gps_package() -> Path:
    path = ROOT / ".cache" / "packages" / "hl7.terminology.r4" / "package"
    if not path.is_dir():
        raise SystemExit(f"{path} is missing: run scripts/test once (it fetches hl7.terminology.r4)")
    return path


async def load_all(uri: str) -> dict[str, float]:
    from terminology.definitions import install
    from terminology.loaders.local import load_local_table
    from terminology.loaders.loinc import load_loinc
    from terminology.loaders.snomed import load_gps

    store = await Store.open(uri, DATABASE)
    install(store, Settings(mongodb_uri=uri))
    timings = {}
    try:
        started = time.perf_counter()
        await load_loinc(store, shared_data() / "loinc-subset")
        timings["load LOINC subset"] = time.perf_counter() - started
        started = time.perf_counter()
        await load_gps(store, gps_package())
        timings["load SNOMED GPS (26,158 concepts)"] = time.perf_counter() - started
        await load_local_table(store, TABLE, HOSPITAL, "hospital-lab", "zh-CN")
    finally:
        await store.close()
    return timings


CASES: dict[str, Callable[[int], tuple[str, dict[str, str]]]] = {
    "$lookup": lambda i: ("CodeSystem/$lookup", {"system": "http://loinc.org", "code": ("1039-7", "11702-8", "3105-4")[i % 3]}),
    "$validate-code": lambda i: ("ValueSet/$validate-code", {"url": "http://loinc.org?fhir_vs", "system": "http://loinc.org", "code": ("1039-7", "11702-8", "3105-4")[i % 3]}),
    "$translate": lambda i: ("ConceptMap/$translate", {"system": HOSPITAL, "code": ("HGB", "HBA1C", "WBC")[i % 3], "targetsystem": "http://loinc.org"}),
    "$expand GPS filter": lambda i: ("ValueSet/$expand", {"url": "http://snomed.info/sct?fhir_vs", "filter": ("diabetes", "fracture of", "asthma")[i % 3], "count": "20"}),
}


def write_synthetic_rf2(folder: Path, concepts: int, seed: int = 42) -> None:
    """A synthetic RF2 snapshot: N concepts, an FSN, a preferred and two acceptable
    synonyms each (en-US language refset), one or two is-a parents per concept."""
    import random

    rnd = random.Random(seed)
    terminology = folder / "Snapshot" / "Terminology"
    language = folder / "Snapshot" / "Refset" / "Language"
    terminology.mkdir(parents=True)
    language.mkdir(parents=True)
    module, date = "900000000000207008", "20250101"
    ids = [str(100000000 + i * 10) for i in range(concepts)]
    words = ["acute", "chronic", "disorder", "of", "left", "right", "structure", "finding", "procedure", "blood", "renal", "cardiac"]
    with (terminology / f"sct2_Concept_Snapshot_INT_{date}.txt").open("w") as c, \
         (terminology / f"sct2_Description_Snapshot-en_INT_{date}.txt").open("w") as d, \
         (terminology / f"sct2_Relationship_Snapshot_INT_{date}.txt").open("w") as r, \
         (language / f"der2_cRefset_LanguageSnapshot-en_INT_{date}.txt").open("w") as lang:
        c.write("id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\n")
        d.write("id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\tcaseSignificanceId\n")
        r.write("id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\trelationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\n")
        lang.write("id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\tacceptabilityId\n")
        description = relationship = 0
        for n, code in enumerate(ids):
            c.write(f"{code}\t{date}\t1\t{module}\t900000000000074008\n")
            name = " ".join(rnd.choice(words) for _ in range(4)) + f" {n}"
            for kind, term, acceptability in (
                ("900000000000003001", f"{name} (disorder)", "900000000000548007"),
                ("900000000000013009", name, "900000000000548007"),
                ("900000000000013009", f"{name} NOS", "900000000000549004"),
                ("900000000000013009", f"{name} syndrome", "900000000000549004"),
            ):
                description += 1
                did = f"{description}011"
                d.write(f"{did}\t{date}\t1\t{module}\t{code}\ten\t{kind}\t{term}\t900000000000448009\n")
                lang.write(f"{description:08x}-0000-0000-0000-000000000000\t{date}\t1\t{module}\t900000000000509007\t{did}\t{acceptability}\n")
            if n:  # a 4-ary tree (depth ~9 for 370k), a third of concepts with a second parent
                parents = {ids[(n - 1) // 4]}
                if rnd.random() < 0.33 and (n - 1) // 4 + 1 < n:
                    parents.add(ids[(n - 1) // 4 + 1])
                for parent in parents:
                    relationship += 1
                    r.write(f"{relationship}021\t{date}\t1\t{module}\t{code}\t{parent}\t0\t116680003\t900000000000011006\t900000000000451002\n")


async def load_synthetic(uri: str, folder: Path) -> float:
    from terminology.definitions import install
    from terminology.loaders.snomed import load_rf2

    store = await Store.open(uri, DATABASE)
    install(store, Settings(mongodb_uri=uri))
    try:
        started = time.perf_counter()
        await load_rf2(store, folder)
        return time.perf_counter() - started
    finally:
        await store.close()


def measure(base: str, requests: int) -> dict[str, dict[str, float]]:
    results = {}
    with httpx.Client(base_url=base.rstrip("/") + "/", timeout=60, headers={"Accept": "application/fhir+json"}) as client:
        for name, case in CASES.items():
            for i in range(20):  # warm-up
                path, params = case(i)
                client.get(path, params=params).raise_for_status()
            latencies = []
            started = time.perf_counter()
            for i in range(requests):
                path, params = case(i)
                t0 = time.perf_counter()
                client.get(path, params=params).raise_for_status()
                latencies.append((time.perf_counter() - t0) * 1000)
            elapsed = time.perf_counter() - started
            latencies.sort()
            results[name] = {
                "p50": statistics.median(latencies),
                "p95": latencies[int(len(latencies) * 0.95) - 1],
                "rps": requests / elapsed,
                "rps8": asyncio.run(concurrent_rps(base, case, requests)),
            }
    return results


async def concurrent_rps(base: str, case: Callable[[int], tuple[str, dict[str, str]]], requests: int, workers: int = 8) -> float:
    async with httpx.AsyncClient(base_url=base.rstrip("/") + "/", timeout=60) as client:
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                path, params = case(i)
                (await client.get(path, params=params)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return requests / (time.perf_counter() - started)


def start_server(uri: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "KUROSHIO_MONGODB_URI": uri, "KUROSHIO_MONGODB_DATABASE": DATABASE,
           "KUROSHIO_PORT": str(port), "KUROSHIO_DICOM_PORT": str(free_port()), "KUROSHIO_DATA_DIR": str(data_dir)}
    log = open(data_dir / "server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/fhir"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--peer", default=None, help="another FHIR terminology server to compare with")
    parser.add_argument("--snomed-scale", type=int, default=0, help="also load a synthetic RF2 snapshot of this many concepts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedMongod(Path(tmp) / "mongod", cache_size_gb=1) as mongod:
        timings = asyncio.run(load_all(mongod.uri))
        if args.snomed_scale:
            import resource

            write_synthetic_rf2(Path(tmp) / "rf2", args.snomed_scale)
            label = f"load synthetic RF2 ({args.snomed_scale:,} concepts)"
            timings[label] = asyncio.run(load_synthetic(mongod.uri, Path(tmp) / "rf2"))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
            print(f"  loader peak memory (this process): {peak:.2f} GiB")
        process, base = start_server(mongod.uri, Path(tmp))
        try:
            ours = measure(base, args.requests)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    peer = measure(args.peer, args.requests) if args.peer else None
    print("Kuroshio terminology benchmark")
    for name, seconds in timings.items():
        print(f"  {name:40s} {seconds:8.2f} s")
    print(f"  {'operation':22s} {'p50 ms':>8s} {'p95 ms':>8s} {'req/s':>8s} {'req/s x8':>9s}" + ("   peer p50   ratio" if peer else ""))
    for name, figures in ours.items():
        line = f"  {name:22s} {figures['p50']:8.2f} {figures['p95']:8.2f} {figures['rps']:8.0f} {figures['rps8']:9.0f}"
        if peer:
            line += f"   {peer[name]['p50']:8.2f} {figures['p50'] / peer[name]['p50']:7.2f}x"
        print(line)
    print("  targets: p50 <= 3 ms (lookup, validate-code, translate), <= 50 ms (filtered expand)")


if __name__ == "__main__":
    main()
