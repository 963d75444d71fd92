"""Whole slide image benchmark: Kuroshio against Orthanc (with its DICOMweb and WSI
plugins), the same slide and the same client, one run.

The slide: 40,960 x 40,960 pixels in 256 x 256 JPEG tiles (25,600 tiles on the base level,
nine levels down to one tile, a label and an overview; about 1.2 GB of DICOM). It is built
once by tests/wsi/slides.py (an OME-TIFF written from 64 pre-encoded tile variants,
converted by wsidicomizer with the missing levels added) and cached in bench/out/.

Measured on each server:
- ingest: STOW-RS of the whole pyramid in one streamed request (seconds, MB/s);
- tiles: random base-level tiles, 30 s with 8 connections of wrk (requests/s, p50, p95), from
  Kuroshio's DICOMweb `/frames/N` (as stored, image/jpeg) and from Orthanc's WSI plugin
  route `/wsi/tiles/...` (its way of serving slide tiles fast);
- DICOMweb frames one at a time (`/frames/N`, p50 of 20 sequential requests) on both:
  Orthanc parses the whole 900 MB instance for each, so with 8 clients it needs over
  14 GB of memory, which this shared machine does not spare;
- Kuroshio only: rendered 512x512 regions of the base level (`/rendered?viewport=...`,
  p50 of sequential requests), and wsidicom's `open_web` plus 100 `read_region` calls of
  512x512 (seconds, p50 per call).
Orthanc runs in network namespace kuroshio-peer (shared/peers/orthanc.sh); its workload
runs there too (this script re-runs itself with --worker).

Needs wrk (apt-get install wrk).

    python bench/wsi.py [--size 40960] [--requests 6000] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dicom import NAMESPACE, kuroshio, orthanc, peer_script, print_ratios  # noqa: E402
from bench.loadgen import wrk  # noqa: E402

OUT = ROOT / "bench" / "out"
TARGETS = {"tiles_per_s": 1000, "tiles_p50_ms": 5, "rendered_p50_ms": 50}
# As wsidicom asks (without transfer-syntax, image/jpeg means JPEG lossless, PS3.18 8.7.3.5.2).
JPEG_FRAME = {"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50'}
CLIENTS = 8  # concurrent connections of the tile load
LOAD_S = 30  # seconds of tile load per server
PEER_MEMORY = 8 << 30  # the peer's workload is stopped if it grows past this


def slide(size: int) -> list[Path]:
    """The benchmark slide's DICOM files (built once, then taken from bench/out)."""
    from tests.wsi import slides

    target = OUT / f"wsi-{size}"
    manifest = target / "files.json"
    if manifest.is_file():
        return [target / name for name in json.loads(manifest.read_text())]
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    print(f"building a {size}x{size} slide in {target} (once)", file=sys.stderr)
    tiff = slides.write_tiff(target / "slide.ome.tif", size, size, repeat_tiles=64)
    files = slides.dicomize(tiff, {"slide": slides.Conversion(target / "dicom")}, workers=2)["slide"]
    tiff.unlink()
    manifest.write_text(json.dumps([str(f.relative_to(target)) for f in files]))
    return files


def _body(files: list[Path], boundary: str) -> Iterator[bytes]:
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def ingest(base: str, files: list[Path]) -> dict[str, float]:
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=benchslide'}
    start = time.perf_counter()
    response = httpx.post(f"{base}/studies", content=_body(files, "benchslide"), headers=headers, timeout=3600)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    size = sum(f.stat().st_size for f in files)
    return {"ingest_s": elapsed, "ingest_mb_per_s": size / elapsed / 1e6}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _wrk(urls: list[str], headers: dict[str, str], seconds: int) -> dict[str, float]:
    result = wrk(urls, headers, seconds, CLIENTS)
    if result["failed"] + result["non_ok"] > result["requests"] // 10:
        raise RuntimeError(f"{result['failed'] + result['non_ok']} of {result['requests']} tile requests failed")
    return result


def base_level(files: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(max(files, key=lambda p: p.stat().st_size), stop_before_pixels=True)


def tiles(ds: pydicom.Dataset, count: int) -> list[int]:
    """The same random frame numbers for every server."""
    return random.Random(7).choices(range(1, int(ds.NumberOfFrames) + 1), k=count)


def _frame_url(base: str, ds: pydicom.Dataset) -> str:
    return f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/"


def tile_load(urls: list[str], headers: dict[str, str]) -> dict[str, float]:
    _wrk(urls, headers, 5)  # warm-up
    result = _wrk(urls, headers, LOAD_S)
    return {"tiles_per_s": result["per_s"], "tiles_p50_ms": result["p50_ms"], "tiles_p95_ms": result["p95_ms"],
            "tiles_answered": result["requests"]}


def frames_sequential(base: str, ds: pydicom.Dataset, count: int = 20) -> dict[str, float]:
    url = _frame_url(base, ds)
    latencies = []
    with httpx.Client(timeout=300) as client:
        for number in tiles(ds, count):
            began = time.perf_counter()
            client.get(url + str(number), headers=JPEG_FRAME).raise_for_status()
            latencies.append(time.perf_counter() - began)
    return {"frame_sequential_p50_ms": 1000 * _percentile(latencies, 0.5)}


def rendered(base: str, ds: pydicom.Dataset, count: int = 100) -> dict[str, float]:
    url = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered"
    rng = random.Random(11)
    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            x, y = rng.randrange(0, int(ds.TotalPixelMatrixColumns) - 512), rng.randrange(0, int(ds.TotalPixelMatrixRows) - 512)
            began = time.perf_counter()
            response = client.get(url, params={"viewport": f"512,512,{x},{y},512,512"}, headers={"Accept": "image/jpeg"})
            latencies.append(time.perf_counter() - began)
            response.raise_for_status()
    return {"rendered_p50_ms": 1000 * _percentile(latencies, 0.5)}


def open_web(base: str, ds: pydicom.Dataset, calls: int = 100) -> dict[str, float]:
    from dicomweb_client.api import DICOMwebClient
    from wsidicom import WsiDicom, WsiDicomWebClient

    start = time.perf_counter()
    slide_ = WsiDicom.open_web(WsiDicomWebClient(DICOMwebClient(url=base)), ds.StudyInstanceUID, ds.SeriesInstanceUID)
    opened = time.perf_counter() - start
    rng = random.Random(13)
    latencies = []
    with slide_:
        for _ in range(calls):
            x, y = rng.randrange(0, slide_.size.width - 512), rng.randrange(0, slide_.size.height - 512)
            began = time.perf_counter()
            slide_.read_region((x, y), 0, (512, 512))
            latencies.append(time.perf_counter() - began)
    return {"open_web_s": opened, "read_region_total_s": sum(latencies),
            "read_region_p50_ms": 1000 * _percentile(latencies, 0.5)}


def orthanc_tile_urls(root: str, ds: pydicom.Dataset, count: int) -> list[str]:
    """The same tiles through Orthanc's WSI plugin (`/wsi/tiles/{series}/0/{x}/{y}`)."""
    found = httpx.post(f"{root}/tools/lookup", content=str(ds.SeriesInstanceUID), timeout=60).json()
    series = next(item["ID"] for item in found if item["Type"] == "Series")
    across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    return [f"{root}/wsi/tiles/{series}/0/{(n - 1) % across}/{(n - 1) // across}" for n in tiles(ds, count)]


def workload(base: str, files: list[Path], count: int, peer: bool) -> dict[str, float]:
    ds = base_level(files)
    results = ingest(base, files)
    if peer:
        results.update(tile_load(orthanc_tile_urls(base.rsplit("/dicom-web", 1)[0], ds, count), {}))
    else:
        results.update(tile_load([_frame_url(base, ds) + str(n) for n in tiles(ds, count)], JPEG_FRAME))
    results.update(frames_sequential(base, ds))
    if not peer:
        results.update(rendered(base, ds))
        results.update(open_web(base, ds))
    return results


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def _guarded(worker: subprocess.Popen[str], peer_pid: int) -> tuple[str, str]:
    """Wait for the peer workload, ending it if the peer outgrows PEER_MEMORY (the machine is shared)."""
    while True:
        try:
            return worker.communicate(timeout=1)
        except subprocess.TimeoutExpired:
            if _rss(peer_pid) > PEER_MEMORY:
                worker.kill()
                _, stderr = worker.communicate()
                return "", f"Orthanc grew past {PEER_MEMORY >> 30} GB; workload stopped\n{stderr}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=40960)
    parser.add_argument("--requests", type=int, default=6000, help="distinct random tiles to cycle through")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("BASE", "FILES"))
    args = parser.parse_args()
    if args.worker:
        base, listed = args.worker
        print(json.dumps(workload(base, [Path(p) for p in json.loads(listed)], args.requests, peer=True)))
        return
    if shutil.which("wrk") is None:
        sys.exit("the tile load is generated by wrk: apt-get install wrk")
    files = slide(args.size)
    print(f"slide: {len(files)} instances, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB, "
          f"{base_level(files).NumberOfFrames} base tiles", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="kuroshio-bench-wsi-"))
    results: dict[str, dict[str, float]] = {}
    with kuroshio(workdir) as (base, _):
        results["kuroshio"] = workload(base, files, args.requests, peer=False)
    shutil.rmtree(workdir / "data", ignore_errors=True)
    if not args.no_peer and peer_script() is not None:
        with orthanc(workdir) as peer_dir:
            worker = subprocess.Popen(
                ["ip", "netns", "exec", NAMESPACE, sys.executable, __file__, "--requests", str(args.requests),
                 "--worker", "http://127.0.0.1:8042/dicom-web", json.dumps([str(f) for f in files])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            stdout, stderr = _guarded(worker, int((peer_dir / "orthanc.pid").read_text()))
            if worker.returncode == 0:
                results["orthanc"] = json.loads(stdout.strip().splitlines()[-1])
            else:
                print(f"the Orthanc workload failed:\n{stderr[-3000:]}", file=sys.stderr)
    print_ratios(results, TARGETS, lambda metric: metric.endswith(("_ms", "_s")) and not metric.endswith("per_s"))
    print("(ratio > 1 means Kuroshio is better; Orthanc's tiles_* are its WSI plugin's /wsi/tiles route)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
