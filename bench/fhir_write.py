"""FHIR write and read throughput: Kuroshio against sekmet-fhir, in the same run.

Workloads (issue 2):
- ingest of the Synthea transaction bundles (`synthea -p 10 -s 42`, ~21,000 resources),
  sequentially and with 4 concurrent clients, in resources/second;
- create/s and read/s with 8 concurrent connections, with p50/p95 latency.

Both servers are started fresh by this script (Kuroshio on its embedded MongoDB,
sekmet with ../shared/peers/sekmet.sh) and driven by the same clients: aiohttp posts the
bundles; wrk (bench/loadgen.py) drives creates and reads, because a Python client with 8
connections takes a large share of this 2-core machine's CPU from the server it measures.

    python bench/fhir_write.py [--patients 10] [--seed 42] [--seconds 10] [--no-peer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.loadgen import wrk  # noqa: E402
SEKMET = ROOT.parent / "shared" / "peers" / "sekmet.sh"
OUT = ROOT / "bench" / "out"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
CLIENTS = 8


def synthea_bundles(patients: int, seed: int) -> list[bytes]:
    target = OUT / f"synthea-p{patients}-s{seed}"
    if not (target / "fhir").is_dir():
        synthea = shutil.which("synthea") or str(Path(sys.executable).parent / "synthea")
        subprocess.run([synthea, "-p", str(patients), "-s", str(seed), "-o", str(target)], check=True,
                       stdout=subprocess.DEVNULL)
    return [path.read_bytes() for path in sorted((target / "fhir").glob("*.json"))]


def free_port() -> int:
    from server.store.mongod import free_port as pick

    return pick()


def start_kuroshio(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "KUROSHIO_PORT": str(port), "KUROSHIO_DATA_DIR": str(data_dir),
           "KUROSHIO_DICOM_PORT": str(free_port())}
    env.pop("KUROSHIO_MONGODB_URI", None)
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/fhir"
    wait_up(base, process)
    return process, base


def wait_up(base: str, process: subprocess.Popen[bytes] | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server at {base} exited")
        try:
            with urllib.request.urlopen(f"{base}/metadata", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{base} did not come up")


@dataclass
class Figures:
    ingest_sequential: float = 0.0
    ingest_concurrent: float = 0.0
    create_rate: float = 0.0
    create_p50: float = 0.0
    create_p95: float = 0.0
    read_rate: float = 0.0
    read_p50: float = 0.0
    read_p95: float = 0.0


def count_entries(bundle: bytes) -> int:
    return len(json.loads(bundle)["entry"])


async def ingest(session: aiohttp.ClientSession, base: str, bundles: list[bytes], clients: int) -> float:
    queue = list(bundles)
    total = sum(count_entries(b) for b in bundles)

    async def worker() -> None:
        while queue:
            body = queue.pop()
            async with session.post(f"{base}", data=body, headers=FHIR_JSON) as response:
                text = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"transaction failed: {response.status} {text[:300]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return total / (time.perf_counter() - started)


def load(urls: list[str], seconds: float, body: bytes | None = None) -> dict[str, float]:
    result = wrk(urls, FHIR_JSON, seconds, CLIENTS, body)
    if result["failed"] or result["non_ok"]:
        raise RuntimeError(f"{result['failed']} failed and {result['non_ok']} non-2xx answers from {urls[0]}")
    return result


async def measure(base: str, bundles: list[bytes], seconds: float) -> Figures:
    figures = Figures()
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        figures.ingest_sequential = await ingest(session, base, bundles, 1)
        figures.ingest_concurrent = await ingest(session, base, bundles, 4)
        patient = json.dumps({"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Mark"]}],
                              "birthDate": "1970-01-01", "gender": "female"}).encode()
        async with session.post(f"{base}/Patient", data=patient, headers=FHIR_JSON) as response:
            created = await response.json(content_type=None)
    load([f"{base}/Patient"], 2, patient)  # warm-up
    creates = load([f"{base}/Patient"], seconds, patient)
    figures.create_rate, figures.create_p50, figures.create_p95 = creates["per_s"], creates["p50_ms"], creates["p95_ms"]
    read_url = f"{base}/Patient/{created['id']}"
    load([read_url], 2)
    reads = load([read_url], seconds)
    figures.read_rate, figures.read_p50, figures.read_p95 = reads["per_s"], reads["p50_ms"], reads["p95_ms"]
    return figures


def report(rows: dict[str, Figures]) -> None:
    names = list(rows)
    fields = [
        ("ingest, 1 client (resources/s)", "ingest_sequential", True),
        ("ingest, 4 clients (resources/s)", "ingest_concurrent", True),
        ("create, 8 connections (/s)", "create_rate", True),
        ("create p50 (ms)", "create_p50", False),
        ("create p95 (ms)", "create_p95", False),
        ("read, 8 connections (/s)", "read_rate", True),
        ("read p50 (ms)", "read_p50", False),
        ("read p95 (ms)", "read_p95", False),
    ]
    header = f"{'workload':34}" + "".join(f"{n:>14}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for label, attribute, higher_is_better in fields:
        values = [getattr(rows[n], attribute) for n in names]
        line = f"{label:34}" + "".join(f"{v:14.1f}" for v in values)
        if len(values) == 2 and values[1]:
            ratio = values[0] / values[1] if higher_is_better else values[1] / values[0]
            line += f"{ratio:9.2f}x"
        print(line)
    if len(names) == 2:
        print("(ratio > 1 means Kuroshio is better: faster, or lower latency)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seconds", type=float, default=10, help="duration of the create and of the read load")
    parser.add_argument("--no-peer", action="store_true", help="measure Kuroshio only")
    args = parser.parse_args()

    bundles = synthea_bundles(args.patients, args.seed)
    print(f"{len(bundles)} Synthea bundles, {sum(count_entries(b) for b in bundles)} resources")
    rows: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="kuroshio-bench-") as scratch:
        process, base = start_kuroshio(Path(scratch) / "kuroshio")
        try:
            rows["kuroshio"] = asyncio.run(measure(base, bundles, args.seconds))
        finally:
            process.terminate()
            process.wait(60)
        if not args.no_peer:
            peer_dir = Path(scratch) / "sekmet"
            port = free_port()
            subprocess.run(["bash", str(SEKMET), "start", str(peer_dir), str(port)], check=True,
                           stdout=subprocess.DEVNULL)
            try:
                rows["sekmet"] = asyncio.run(measure(f"http://127.0.0.1:{port}/fhir", bundles, args.seconds))
            finally:
                subprocess.run(["bash", str(SEKMET), "stop", str(peer_dir)], check=False)
    report(rows)


if __name__ == "__main__":
    main()
