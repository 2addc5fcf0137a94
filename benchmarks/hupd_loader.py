"""Benchmark hfplug's HUPD loader against the official approach and plain decompression.

    python benchmarks/hupd_loader.py            # ~55 MB and ~110 MB archives (~3 minutes)
    python benchmarks/hupd_loader.py --quick    # smoke run on small archives (~20 s)

It generates two synthetic archives in the real ``sample`` layout (records sized like real
HUPD ones, ~60 KB of JSON each), the second twice the size of the first, and times side by
side, each in a fresh process:

* ``hfplug``: ``load_hupd(uniform_split=True)`` into an empty cache dir (metadata, selection,
  one streaming pass, then each split's Arrow file in the official row order);
* ``official``: what the official loading script does: ``tarfile.extractall`` of the whole
  archive to disk, then ``json.load`` of each selected record (timed without the Arrow
  writing upstream also does, so the baseline is if anything too fast);
* ``gunzip``: ``gzip -dc archive > /dev/null``, the floor for any reader of the file;
* ``hfplug_unthreaded``: ``hfplug`` with the gzip stream inflated on the parsing thread, which
  isolates what ``hupd_gunzip._Gunzip``'s background thread gains.

All records are selected (the worst case for hfplug, which skips unselected ones unparsed).
Both must yield the same rows in the same order (checked by a digest of the application numbers).
Each timing is the best of ``--repeat`` runs (the machine may be shared). Peak RSS is each
worker's own ``ru_maxrss``. Targets: hfplug >= 2x faster than ``official``, <= 3x the time of
``gunzip``, and its peak RSS grows < 20% when the archive doubles.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGET_SPEEDUP = 2.0  # hfplug vs official, at least
TARGET_VS_GUNZIP = 3.0  # hfplug / gunzip, at most
TARGET_RSS_GROWTH = 0.20  # peak RSS growth when the archive doubles, less than
FULL_RECORDS = 4000  # ~55 MB of .tar.gz with the word counts below
QUICK_RECORDS = 300
DESCRIPTION_WORDS = (4000, 10000)  # real detailed descriptions run to thousands of words


# --- workers (each runs in its own process) ------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    Linux's ``ru_maxrss`` survives ``exec`` (a child reports its parent's peak if that was
    higher), so the per-image high-water mark ``VmHWM`` is read where it exists.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def work_hfplug(metadata: str, archive: str, scratch: str) -> dict:
    from hfplug.data.hupd import load_hupd

    start = time.perf_counter()
    result = load_hupd(
        hupd_metadata_path=metadata, hupd_archive_path=archive, uniform_split=True, hupd_cache_dir=scratch
    )
    seconds = time.perf_counter() - start
    order = {split: list(result[split]["application_number"]) for split in result}
    return {"seconds": seconds, "rows": sum(split.num_rows for split in result.values()), "order": _digest(order)}


def work_hfplug_unthreaded(metadata: str, archive: str, scratch: str) -> dict:
    """``hfplug`` with the archive inflated on the parsing thread: what the gunzip thread alone buys."""
    from hfplug.data import hupd_gunzip

    hupd_gunzip._Gunzip.__init__.__kwdefaults__["threaded"] = False
    return work_hfplug(metadata, archive, scratch)


def _digest(order: dict[str, list[str]]) -> str:
    """One hash of each split's application numbers, in order."""
    return hashlib.sha256(json.dumps(order, sort_keys=True).encode()).hexdigest()[:16]


def work_official(metadata: str, archive: str, scratch: str) -> dict:
    """The official script's data path: extract everything, then open each selected JSON."""
    import tarfile

    from hfplug.data.hupd import read_metadata, record_to_example
    from hfplug.data.hupd_selection import select_splits

    start = time.perf_counter()
    selection = select_splits(read_metadata(metadata), uniform_split=True)
    with tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
    json_dir = Path(scratch) / "sample"
    order: dict[str, list[str]] = {}
    for split, df in selection.items():
        for row in df.itertuples():
            with open(json_dir / str(row.filing_date.year) / f"{row.application_number}.json") as handle:
                example = record_to_example(row.application_number, json.load(handle))
            order.setdefault(split, []).append(example["application_number"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": sum(map(len, order.values())), "order": _digest(order)}


def work_imports(metadata: str, archive: str, scratch: str) -> dict:
    """Only the imports: the RSS floor that every loader process starts from."""
    import hfplug.data.hupd  # noqa: F401

    return {"seconds": 0.0, "rows": 0}


WORKERS = {
    "hfplug": work_hfplug,
    "hfplug_unthreaded": work_hfplug_unthreaded,
    "official": work_official,
    "imports": work_imports,
}


def run_worker(kind: str, metadata: Path, archive: Path, workdir: Path) -> dict:
    """Run one worker in a fresh interpreter with an empty scratch dir; return its report."""
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{kind}-"))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind, str(metadata), str(archive), str(scratch)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def time_gunzip(archive: Path) -> float:
    start = time.perf_counter()
    with open(archive, "rb") as src:
        subprocess.run(["gzip", "-dc"], stdin=src, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


# --- driver --------------------------------------------------------------------------------


def make_archive(out_dir: Path, n_records: int, seed: int):
    """Generate an archive in a child process, so this driver stays small in memory."""
    from hfplug.testing.hupd_synthetic import FILE_NAMES, HupdSampleFiles

    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hfplug.testing.hupd_synthetic",
            str(out_dir),
            "--n-records",
            str(n_records),
            "--seed",
            str(seed),
            "--description-words",
            *map(str, DESCRIPTION_WORDS),
        ],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    metadata_name, archive_name = FILE_NAMES["sample"]
    files = HupdSampleFiles(out_dir / metadata_name, out_dir / archive_name, n_records, "sample")
    mb = files.archive_path.stat().st_size / 1e6
    print(f"generated {n_records} records: {mb:.1f} MB archive in {time.perf_counter() - start:.0f} s", flush=True)
    return files


def measure(files, workdir: Path, repeat: int) -> dict:
    best: dict[str, dict] = {}
    for _ in range(repeat):
        for kind in ("hfplug", "official", "hfplug_unthreaded"):
            report = run_worker(kind, files.metadata_path, files.archive_path, workdir)
            if kind not in best or report["seconds"] < best[kind]["seconds"]:
                best[kind] = {**report, "rss": max(report["rss"], best.get(kind, {}).get("rss", 0))}
        gunzip = time_gunzip(files.archive_path)
        best["gunzip"] = {"seconds": min(gunzip, best.get("gunzip", {}).get("seconds", gunzip))}
    best["imports"] = run_worker("imports", files.metadata_path, files.archive_path, workdir)
    if best["hfplug"]["rows"] != best["official"]["rows"]:
        raise SystemExit(f"row counts differ: hfplug {best['hfplug']['rows']}, official {best['official']['rows']}")
    if not best["hfplug"]["order"] == best["official"]["order"] == best["hfplug_unthreaded"]["order"]:
        raise SystemExit("hfplug's rows are not in the official loader's order")
    return best


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report(results: list[tuple[float, dict]]) -> bool:
    print()
    print(
        f"{'archive':>9} | {'hfplug':>8} | {'official':>8} | {'gunzip':>7} | {'speedup':>7} | {'/gunzip':>7} |"
        f" {'hfplug RSS':>10} | {'official RSS':>12} | {'import RSS':>10}"
    )
    for mb, r in results:
        print(
            f"{mb:7.1f}MB | {r['hfplug']['seconds']:7.2f}s | {r['official']['seconds']:7.2f}s |"
            f" {r['gunzip']['seconds']:6.2f}s | {r['official']['seconds'] / r['hfplug']['seconds']:6.2f}x |"
            f" {r['hfplug']['seconds'] / r['gunzip']['seconds']:6.2f}x | {r['hfplug']['rss']:8.0f}MB |"
            f" {r['official']['rss']:10.0f}MB | {r['imports']['rss']:8.0f}MB"
        )
    print()
    ok = True
    for mb, r in results:
        speedup = r["official"]["seconds"] / r["hfplug"]["seconds"]
        vs_gunzip = r["hfplug"]["seconds"] / r["gunzip"]["seconds"]
        ok &= speedup >= TARGET_SPEEDUP and vs_gunzip <= TARGET_VS_GUNZIP
        print(
            f"{mb:.0f} MB: {speedup:.2f}x faster than extract-then-read (target >= {TARGET_SPEEDUP:g}x) "
            f"{verdict(speedup >= TARGET_SPEEDUP)}; {vs_gunzip:.2f}x of gzip -dc (target <= {TARGET_VS_GUNZIP:g}x) "
            f"{verdict(vs_gunzip <= TARGET_VS_GUNZIP)}"
        )
    for mb, r in results:
        gain = r["hfplug_unthreaded"]["seconds"] / r["hfplug"]["seconds"]
        print(
            f"{mb:.0f} MB: gunzip on its own thread {r['hfplug']['seconds']:.2f}s vs on the parsing thread "
            f"{r['hfplug_unthreaded']['seconds']:.2f}s: {gain:.2f}x (kept only if > 1)"
        )
    (small_mb, small), (big_mb, big) = results
    growth = big["hfplug"]["rss"] / small["hfplug"]["rss"] - 1
    own_small = small["hfplug"]["rss"] - small["imports"]["rss"]
    own_big = big["hfplug"]["rss"] - big["imports"]["rss"]
    ok &= growth < TARGET_RSS_GROWTH
    print(
        f"peak RSS {small['hfplug']['rss']:.0f} MB -> {big['hfplug']['rss']:.0f} MB when the archive grows "
        f"{big_mb / small_mb:.1f}x: {growth:+.1%} (target < {TARGET_RSS_GROWTH:.0%}) {verdict(growth < TARGET_RSS_GROWTH)}; "
        f"above the import floor: {own_small:.0f} MB -> {own_big:.0f} MB"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} records instead of {FULL_RECORDS}")
    parser.add_argument("--records", type=int, help="records in the smaller archive (the other has twice as many)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per measurement, best kept (default 3; 1 quick)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where archives and scratch go (default: a temp dir)"
    )
    parser.add_argument(
        "--worker", nargs=4, metavar=("KIND", "METADATA", "ARCHIVE", "SCRATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.worker:
        kind, metadata, archive, scratch = args.worker
        result = WORKERS[kind](metadata, archive, scratch)
        print(json.dumps({**result, "rss": _peak_rss_mb()}))
        return 0

    n_records = args.records or (QUICK_RECORDS if args.quick else FULL_RECORDS)
    repeat = args.repeat or (1 if args.quick else 3)
    workdir = Path(tempfile.mkdtemp(prefix="hupd-bench-", dir=args.workdir))
    try:
        results = []
        for i, n in enumerate((n_records, 2 * n_records)):
            files = make_archive(workdir / f"archive{i}", n, seed=i)
            mb = files.archive_path.stat().st_size / 1e6
            if not args.quick and i == 0 and mb < 50:
                print(f"note: the smaller archive is {mb:.0f} MB (< 50 MB); raise --records", flush=True)
            results.append((mb, measure(files, workdir, repeat)))
        ok = report(results)
        if args.quick:
            print("(--quick: fixed start-up costs dominate at these sizes; the targets are for the full run)")
            ok = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
