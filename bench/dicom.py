"""DICOM benchmark: Kuroshio against Orthanc, the same data and the same client, one run.

500 synthetic 512x512 16-bit CT instances (about 531 KB each, 5 studies of 100):
STOW-RS in batches of 50, QIDO study by UID, QIDO all instances of a 100-instance study,
WADO-RS metadata of that study, WADO-RS retrieval of that study (MB/s), frames/1
requests/s, C-ECHO with dcmtk's echoscu (`echo_ms`: a whole association, from the
process's start to its release, the cost a PACS pays for each association it opens), and
C-STORE of 100 instances with dcmtk's storescu (TCP_NODELAY=1).

Kuroshio reflects each new study as a FHIR ImagingStudy in the background, a second after
its last instance; the queries are timed once that is done (`reflect_s` says how long
after the last STOW it was), so that they measure a query, not a query sharing two cores
with five studies' reflection.

Orthanc is started with the shared peer script (`peers/orthanc.sh`, in network namespace
kuroshio-peer); the workload against it runs in that namespace (this script re-runs itself
there with `--worker`). Usage: python bench/dicom.py [--instances 500] [--no-peer]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NAMESPACE = "kuroshio-peer"
TARGETS = {"stow_per_s": 250, "cstore_per_s": 150, "qido_study_ms": 3, "qido_instances_ms": 30,
           "metadata_ms": 20, "frames_per_s": 300}


def make_instances(directory: Path, count: int, per_study: int = 100) -> list[list[Path]]:
    """`count` 512x512 16-bit CT instances (the tests' synthetic CT, full size), in studies
    of `per_study`, written as PS3.10 files."""
    from pydicom.uid import generate_uid

    from tests.dicom.conftest import ct_instance

    pixels = (np.random.default_rng(1).integers(0, 4096, 512 * 512, dtype=np.uint16)).tobytes()
    studies: list[list[Path]] = []
    for index in range(count):
        if index % per_study == 0:
            study, series = generate_uid(), generate_uid()
            studies.append([])
        ds = ct_instance(study, series, number=index % per_study + 1, patient_id=f"BENCH-{len(studies)}",
                         patient_name=f"Bench^{len(studies)}", size=512)
        ds.ImagePositionPatient = [0, 0, index]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1
        ds.PixelData = pixels
        path = directory / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies[-1].append(path)
    return studies


def multipart(paths: list[Path], boundary: str = "benchboundary") -> bytes:
    chunks = []
    for path in paths:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def timed(count: int, call) -> float:
    start = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - start) / count


def wait_reflected(client: httpx.Client, fhir: str, studies: int) -> None:
    """Until `studies` ImagingStudy resources exist (the benchmark's studies are sent one
    after another, so each is reflected once, after its last instance)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = client.get(f"{fhir}/ImagingStudy", params={"_summary": "count"})
        response.raise_for_status()
        if response.json()["total"] >= studies:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{studies} studies not reflected as ImagingStudy within 120 s")


def workload(base: str, data: Path, dicom_host: str, dicom_port: int, ae_title: str,
             fhir: str | None = None) -> dict[str, float]:
    """The measured workload against one server (runs in the server's namespace); `fhir`:
    Kuroshio's FHIR base, to wait for the studies' ImagingStudy reflection."""
    import pydicom

    studies = [sorted((data / d).iterdir()) for d in sorted(os.listdir(data)) if (data / d).is_dir() and d.startswith("s")]
    paths = [p for study in studies for p in study]
    extra = sorted((data / "cstore").iterdir())
    results: dict[str, float] = {}
    with httpx.Client(timeout=300) as client:
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=benchboundary'}
        bodies = [multipart(paths[i:i + 50]) for i in range(0, len(paths), 50)]
        start = time.perf_counter()
        for body in bodies:
            response = client.post(f"{base}/studies", content=body, headers=headers)
            response.raise_for_status()
        elapsed = time.perf_counter() - start
        results["stow_per_s"] = len(paths) / elapsed
        results["stow_mb_s"] = sum(p.stat().st_size for p in paths) / elapsed / 1e6
        if fhir is not None:
            wait_reflected(client, fhir, len(studies))
            results["reflect_s"] = time.perf_counter() - start - elapsed
        first = pydicom.dcmread(studies[0][0], stop_before_pixels=True)
        study, series, sop = first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
        json_accept = {"Accept": "application/dicom+json"}
        client.get(f"{base}/studies", params={"StudyInstanceUID": study}, headers=json_accept).raise_for_status()
        results["qido_study_ms"] = 1000 * timed(200, lambda: client.get(
            f"{base}/studies", params={"StudyInstanceUID": study}, headers=json_accept))
        results["qido_instances_ms"] = 1000 * timed(30, lambda: client.get(
            f"{base}/studies/{study}/instances", headers=json_accept))
        results["metadata_ms"] = 1000 * timed(20, lambda: client.get(f"{base}/studies/{study}/metadata", headers=json_accept))
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        size = 0
        start = time.perf_counter()
        for _ in range(3):
            with client.stream("GET", f"{base}/studies/{study}", headers=accept) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    size += len(chunk)
        results["retrieve_mb_s"] = size / (time.perf_counter() - start) / 1e6
        sops = [(p, pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in studies[0][:50]]
        frame_accept = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
        urls = [f"{base}/studies/{study}/series/{series}/instances/{s}/frames/1" for _, s in sops]
        client.get(urls[0], headers=frame_accept).raise_for_status()
        start = time.perf_counter()
        for i in range(300):
            client.get(urls[i % len(urls)], headers=frame_accept).raise_for_status()
        results["frames_per_s"] = 300 / (time.perf_counter() - start)
    nodelay = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    for _ in range(20):
        subprocess.run(["echoscu", "-aec", ae_title, dicom_host, str(dicom_port)], check=True, capture_output=True, env=nodelay)
    results["echo_ms"] = 1000 * (time.perf_counter() - start) / 20
    start = time.perf_counter()
    subprocess.run(["storescu", "-aec", ae_title, dicom_host, str(dicom_port), *map(str, extra)],
                   check=True, capture_output=True, env=nodelay)
    results["cstore_per_s"] = len(extra) / (time.perf_counter() - start)
    return results


def start_kuroshio(workdir: Path) -> tuple[subprocess.Popen[bytes], object, str, int]:
    from server.store.mongod import EmbeddedMongod, free_port

    mongod = EmbeddedMongod(workdir / "mongod")
    mongod.__enter__()
    port, dicom_port = free_port(), free_port()
    env = {**os.environ, "KUROSHIO_MONGODB_URI": mongod.local_uri, "KUROSHIO_PORT": str(port),
           "KUROSHIO_DICOM_PORT": str(dicom_port), "KUROSHIO_DATA_DIR": str(workdir / "data")}
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return process, mongod, f"http://127.0.0.1:{port}/dicomweb", dicom_port


@contextlib.contextmanager
def kuroshio(workdir: Path) -> Iterator[tuple[str, int]]:
    """A Kuroshio server on a fresh embedded MongoDB: (DICOMweb base URL, DIMSE port)."""
    process, mongod, base, dicom_port = start_kuroshio(workdir)
    try:
        yield base, dicom_port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        mongod.__exit__(None, None, None)  # type: ignore[attr-defined]


@contextlib.contextmanager
def orthanc(workdir: Path) -> Iterator[Path]:
    """Orthanc started by the shared peer script in namespace kuroshio-peer: its directory."""
    script = peer_script()
    assert script is not None
    peer_dir = workdir / "orthanc"
    subprocess.run(["bash", str(script), "start", str(peer_dir)], check=True)
    try:
        yield peer_dir
    finally:
        subprocess.run(["bash", str(script), "stop", str(peer_dir)], check=False)


def print_ratios(results: dict[str, dict[str, float]], targets: dict[str, float],
                 lower_is_better: Callable[[str], bool]) -> None:
    """Both servers' figures, the ratio (> 1: Kuroshio is better) and the target."""
    width = max(20, *(len(m) + 2 for m in results["kuroshio"]))
    print(f"{'metric':<{width}}{'kuroshio':>12}{'orthanc':>12}{'ratio':>9}{'target':>9}")
    peer_results = results.get("orthanc", {})
    for metric in list(results["kuroshio"]) + [m for m in peer_results if m not in results["kuroshio"]]:
        value, peer = results["kuroshio"].get(metric), peer_results.get(metric)
        ratio = (peer / value if lower_is_better(metric) else value / peer) if peer and value else None
        print(f"{metric:<{width}}{(f'{value:.1f}' if value is not None else '-'):>12}"
              f"{(f'{peer:.1f}' if peer else '-'):>12}{(f'{ratio:.2f}x' if ratio else '-'):>9}"
              f"{str(targets.get(metric, '')):>9}")


def peer_script() -> Path | None:
    for candidate in (ROOT.parent / "shared" / "peers" / "orthanc.sh", Path("/work/shared/peers/orthanc.sh")):
        if candidate.is_file():
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--worker", nargs=5, metavar=("BASE", "DATA", "HOST", "PORT", "AET"))
    args = parser.parse_args()
    if args.worker:
        base, data, host, port, aet = args.worker
        print(json.dumps(workload(base, Path(data), host, int(port), aet)))
        return
    if shutil.which("storescu") is None:
        sys.exit("dcmtk's storescu is needed (apt-get install dcmtk)")
    workdir = Path(tempfile.mkdtemp(prefix="kuroshio-bench-"))
    data = workdir / "instances"
    data.mkdir()
    print(f"generating {args.instances} instances + 100 for C-STORE in {data}", file=sys.stderr)
    studies = make_instances(data, args.instances + 100)
    for index, paths in enumerate(studies[:-1]):
        (data / f"s{index}").mkdir()
        for path in paths:
            path.rename(data / f"s{index}" / path.name)
    (data / "cstore").mkdir()
    for path in studies[-1]:
        path.rename(data / "cstore" / path.name)
    results: dict[str, dict[str, float]] = {}
    with kuroshio(workdir) as (base, dicom_port):
        results["kuroshio"] = workload(base, data, "127.0.0.1", dicom_port, "KUROSHIO",
                                       fhir=base.removesuffix("/dicomweb") + "/fhir")
    if not args.no_peer and peer_script() is not None:
        with orthanc(workdir):
            out = subprocess.run(
                ["ip", "netns", "exec", NAMESPACE, sys.executable, __file__, "--worker",
                 "http://127.0.0.1:8042/dicom-web", str(data), "127.0.0.1", "4242", "ORTHANC"],
                check=True, capture_output=True, text=True,
            )
            results["orthanc"] = json.loads(out.stdout.strip().splitlines()[-1])
    print_ratios(results, TARGETS, lambda metric: metric.endswith("_ms"))
    print("(ratio > 1 means Kuroshio is better)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
