"""Benchmark how load_hupd scales to the full HUPD: bytes fetched, cache size, parallel build.

    python benchmarks/hupd_scale.py            # 15 years x ~100 applications (~20 MB all-years.tar, ~3 minutes)
    python benchmarks/hupd_scale.py --quick    # 15 years x ~20 applications, one run each (~40 s)

It generates one all-years fixture in the Hub's layout (``data/<year>.tar.gz`` for 2004-2018
in an uncompressed tar) with realistic section lengths (below), then measures, each load in a
fresh process with empty caches:

1. ``hub``: ``load_hupd("all")`` with train/validation dates inside one year (2010), the archive
   left on the Hub, against downloading the whole archive: ``hf_hub_download`` of
   ``data/all-years.tar``, and ``load_hupd`` from a Hub that ignores ``Range`` (the whole-file
   fallback). The Hub is tests/hub_server.py's loopback Hub (this script puts tests/ on
   ``sys.path`` to import it); the workers use the real ``huggingface_hub`` client with
   ``HF_ENDPOINT`` set to it, and the bytes are what the server counted (``sent[path]``).
   Target: archive bytes fetched <= 1.1x the selected year's member size (tar headers included).
   The metadata feather is fetched whole by every variant and is shown apart.
2. ``columns``: cache bytes per 1,000 applications for ``columns=["title", "abstract",
   "decision", "ipc_label"]`` (the two text fields plus both tasks' labels; load_hupd adds its
   ``KEPT_COLUMNS``, and the stored columns are printed) against all fields, both with
   ``uniform_split=True`` over all 15 years. Target: >= 5x smaller.
3. ``num_proc``: build time of that all-years selection with ``num_proc=1`` and ``num_proc=2``.
   Target: >= 1.6x faster with 2. One process keeps ~1.3 cores busy (it inflates each year on a
   second thread while it parses), so two need ~2.6: on fewer than 4 CPUs the script prints the
   ceiling that the one process's busy cores leave. The machine may be shared:
   ``os.getloadavg()`` is printed with the result, each timing is the best of ``--repeat`` runs
   (5: on a shared machine the two-process runs vary most, as they need free cores), alternating
   the two, and the CPU time of the best run (the build's processes included) says how many
   cores it kept busy.
   The same two builds with part 2's pruned columns, as the recipe builds, are printed beside the
   target as information (the target's row is the all-fields build, the library's default).

Section lengths, words (inclusive range, uniform): description 2,000-8,000 (the detailed
part; ``full_description`` also holds the background and summary, as in real records),
claims 500-1,500, summary 100-900, background 100-700, abstract 50-250, title 4. Real HUPD
descriptions run to tens of KB and dwarf the other sections; these give on average ~43 KB of
description, ~9 KB of claims, ~3 KB of summary and of background, ~1.1 KB of abstract and
~35 bytes of title per application (part 2 prints the means it measures), ~60 KB of JSON,
and the archive holds ~13 KB per application (the real one: 56 GB / 4.5M = ~12 KB).

A part whose ``load_hupd`` keyword does not exist yet is reported as not measured. The time
columns of part 1 are loopback times (no network latency or bandwidth limit; the loopback
Hub also hashes the whole file on every request), so part 1's target is on bytes only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the loopback Hub (tests/hub_server.py)

TARGET_BYTES = 1.1  # archive bytes fetched / selected year's member size, at most
TARGET_PRUNING = 5.0  # cache bytes all fields / pruned, at least
TARGET_PARALLEL = 1.6  # build time num_proc=1 / num_proc=2, at least
YEARS = range(2004, 2019)  # HUPD's filing years
SELECTED_YEAR = 2010
PER_YEAR, QUICK_PER_YEAR = 100, 20
SECTION_WORDS = dict(
    description_words=(2000, 8000),
    claims_words=(500, 1500),
    summary_words=(100, 900),
    background_words=(100, 700),
    abstract_words=(50, 250),
)
PRUNED_COLUMNS = ["title", "abstract", "decision", "ipc_label"]
REPO_ID, ARCHIVE, METADATA = "HUPD/hupd", "data/all-years.tar", "hupd_metadata_2022-02-22.feather"
ONE_YEAR = dict(  # train: Jan-Sep, validation: Oct-Dec of the selected year
    train_filing_start_date=f"{SELECTED_YEAR}-01-01",
    train_filing_end_date=f"{SELECTED_YEAR}-10-01",
    val_filing_start_date=f"{SELECTED_YEAR}-10-01",
    val_filing_end_date=f"{SELECTED_YEAR + 1}-01-01",
)


# --- workers (each runs in its own process) ------------------------------------------------


def work_make(out_dir: str, per_year: str, scratch: str) -> dict:
    """Write the fixture: ~per_year applications a year, filing dates uniform over 2004-2018."""
    from hfplug.testing.hupd_synthetic import write_hupd_sample

    files = write_hupd_sample(
        out_dir,
        n_records=int(per_year) * len(YEARS),
        layout="all",
        start_date=f"{YEARS[0]}-01-01",
        end_date=f"{YEARS[-1] + 1}-01-01",
        **SECTION_WORDS,
    )
    return {"metadata": str(files.metadata_path), "archive": str(files.archive_path), "n": files.n_records}


def work_hub_load(out_dir: str, _unused: str, scratch: str) -> dict:
    """``load_hupd("all")`` of one year with the archive on the Hub (HF_ENDPOINT: the loopback Hub)."""
    from hfplug.data.hupd import load_hupd

    start = time.perf_counter()
    result = load_hupd("all", hupd_cache_dir=Path(scratch) / "splits", **ONE_YEAR)
    return {"seconds": time.perf_counter() - start, **_rows(result)}


def work_hub_download(out_dir: str, _unused: str, scratch: str) -> dict:
    """The whole archive into the Hub cache, as a user without range reads would fetch it."""
    from huggingface_hub import hf_hub_download

    start = time.perf_counter()
    hf_hub_download(REPO_ID, ARCHIVE, repo_type="dataset")
    return {"seconds": time.perf_counter() - start}


def work_build(metadata: str, archive: str, scratch: str) -> dict:
    """``load_hupd`` of all 15 years from the local files; options as JSON in $HUPD_SCALE_OPTIONS."""
    from hfplug.data.hupd import load_hupd

    options = json.loads(os.environ.get("HUPD_SCALE_OPTIONS", "{}"))
    cache = Path(scratch) / "splits"
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    result = load_hupd(
        "all",
        hupd_metadata_path=metadata,
        hupd_archive_path=archive,
        hupd_cache_dir=cache,
        uniform_split=True,
        **options,
    )
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {
        "columns": result["train"].column_names,
        "seconds": seconds,
        "cpu": cpu,
        "cache_bytes": cache_bytes,
        "fields": _field_bytes(result),
        **_rows(result),
    }


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended (the build's processes)."""
    import resource

    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _rows(result) -> dict:
    """Row count and one hash of each split's application numbers, in order."""
    order = {split: list(result[split]["application_number"]) for split in result}
    digest = hashlib.sha256(json.dumps(order, sort_keys=True).encode()).hexdigest()[:16]
    return {"rows": sum(map(len, order.values())), "order": digest}


def _field_bytes(result) -> dict[str, float]:
    """Mean UTF-8 bytes per row of each string field present."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total: dict[str, int] = {}
    rows = 0
    for split in result.values():
        table = split.data.table
        rows += table.num_rows
        for name in table.column_names:
            if pa.types.is_string(table.schema.field(name).type) or pa.types.is_large_string(
                table.schema.field(name).type
            ):
                total[name] = total.get(name, 0) + pc.sum(pc.binary_length(table[name])).as_py() or 0
    return {name: n / max(rows, 1) for name, n in total.items()}


WORKERS = {"make": work_make, "hub_load": work_hub_load, "hub_download": work_hub_download, "build": work_build}


def run_worker(kind: str, a: str, b: str, workdir: Path, env: dict | None = None) -> dict:
    """Run one worker in a fresh interpreter with an empty scratch dir; return its report.

    ``env`` is added to this process's environment; a None value removes that variable.
    """
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{kind}-"))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", kind, a, b, str(scratch)],
            capture_output=True,
            text=True,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"worker {kind} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- driver --------------------------------------------------------------------------------


def load_keywords() -> set[str]:
    """load_hupd's keywords in this checkout (parts 2 and 3 need ``columns`` and ``num_proc``)."""
    from hfplug.data.hupd import load_hupd

    return set(inspect.signature(load_hupd).parameters)


def member_sizes(archive: Path) -> dict[str, int]:
    import tarfile

    with tarfile.open(archive) as tar:
        return {info.name: info.size for info in tar.getmembers() if info.isreg()}


def measure_hub(files: dict, workdir: Path, repeat: int) -> dict:
    """Part 1: the three ways to one year's rows through the loopback Hub; bytes as the server counted them."""
    from hub_server import HubServer

    results: dict[str, dict] = {}
    archive, metadata = Path(files["archive"]), Path(files["metadata"])
    data = {
        ARCHIVE: archive.read_bytes(),
        METADATA: metadata.read_bytes(),
    }  # held in memory: no disk reads per request
    with HubServer({}, max_requests=100_000, lifetime=3600.0) as hub:
        hub.add_dataset(REPO_ID, files=data)
        for _ in range(repeat):
            for kind, worker, ranges in (
                ("ranged", "hub_load", True),
                ("download", "hub_download", True),
                ("fallback", "hub_load", False),
            ):
                hub.ranges = ranges
                hub.sent.clear()
                n_requests = len(hub.file_requests)
                env = {
                    "HF_ENDPOINT": hub.url,
                    "HF_HUB_OFFLINE": "0",
                    "HF_HOME": str(workdir / f"hf_home-{kind}"),  # an empty Hub cache each run
                    "HF_HUB_DISABLE_TELEMETRY": "1",
                    "HF_TOKEN": None,  # no token of this machine's: the dataset is public
                    "HUGGING_FACE_HUB_TOKEN": None,
                }
                shutil.rmtree(env["HF_HOME"], ignore_errors=True)
                report = run_worker(worker, str(workdir), "-", workdir, env)
                report["archive_bytes"] = hub.sent[ARCHIVE]
                report["metadata_bytes"] = hub.sent[METADATA]
                report["requests"] = len([r for r in hub.file_requests[n_requests:] if r.path == ARCHIVE])
                shutil.rmtree(env["HF_HOME"], ignore_errors=True)
                if kind not in results or report["seconds"] < results[kind]["seconds"]:
                    results[kind] = report
    start = time.perf_counter()
    hashlib.sha256(data[ARCHIVE]).hexdigest()  # what the loopback Hub does on every request for the file
    results["hash_seconds"] = time.perf_counter() - start
    if results["ranged"]["order"] != results["fallback"]["order"]:
        raise SystemExit("the ranged load and the whole-file fallback gave different rows")
    return results


def measure_builds(files: dict, workdir: Path, variants: dict[str, dict], repeat: int) -> dict:
    """Best of ``repeat`` local builds per variant (alternating), with the load average around them."""
    best: dict[str, dict] = {}
    load_before = os.getloadavg()
    for _ in range(repeat):
        for name, options in variants.items():
            env = {"HUPD_SCALE_OPTIONS": json.dumps(options)}
            report = run_worker("build", files["metadata"], files["archive"], workdir, env)
            report["times"] = best.get(name, {}).get("times", []) + [report["seconds"]]
            if name not in best or report["seconds"] < best[name]["seconds"]:
                best[name] = report
            else:
                best[name]["times"] = report["times"]
    return {"variants": best, "load": (load_before, os.getloadavg())}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def report(files: dict, sizes: dict[str, int], hub: dict, pruning: dict | None, parallel: dict | None) -> bool:
    year_member = sizes[f"data/{SELECTED_YEAR}.tar.gz"]
    cpus = usable_cpus()
    archive_size = Path(files["archive"]).stat().st_size
    print()
    print(
        f"fixture: {files['n']} applications filed 2004-2018, all-years.tar {_mb(archive_size)}, "
        f"data/{SELECTED_YEAR}.tar.gz {_mb(year_member)} ({year_member / archive_size:.1%} of it)"
    )

    print(f"\n1. one year ({SELECTED_YEAR}) of all-years.tar through the loopback Hub")
    print(
        f"{'':>34} | {'archive bytes':>13} | {'/ year member':>13} | {'requests':>8} | {'metadata':>9} | {'time':>7} | rows"
    )
    labels = {
        "ranged": 'load_hupd("all"), range reads',
        "download": "hf_hub_download(all-years.tar)",
        "fallback": "load_hupd, Hub without ranges",
    }
    for kind, label in labels.items():
        r = hub[kind]
        print(
            f"{label:>34} | {_mb(r['archive_bytes']):>13} | {r['archive_bytes'] / year_member:12.3f}x |"
            f" {r['requests']:>8} | {_mb(r['metadata_bytes']):>9} | {r['seconds']:6.2f}s | {r.get('rows', '-')}"
        )

    overhead = hub["hash_seconds"] * hub["ranged"]["requests"]
    print(
        f"   (the loopback Hub hashes the whole file on each request, {hub['hash_seconds'] * 1000:.0f} ms here:"
        f" ~{overhead:.2f} s of the ranged load's {hub['ranged']['seconds']:.2f} s; the Hub does not)"
    )

    rows = []  # (what, measured, target, ok)
    ratio = hub["ranged"]["archive_bytes"] / year_member
    rows.append(
        ("archive bytes fetched / year member", f"{ratio:.3f}x", f"<= {TARGET_BYTES:g}x", ratio <= TARGET_BYTES)
    )
    saved = hub["download"]["archive_bytes"] / hub["ranged"]["archive_bytes"]
    rows.append(("whole-archive bytes / ranged bytes", f"{saved:.1f}x", "(info)", None))
    speed = hub["fallback"]["seconds"] / hub["ranged"]["seconds"]
    rows.append(("fallback load time / ranged (loopback)", f"{speed:.2f}x", "(info)", None))

    print("\n2. cache bytes per 1,000 applications (uniform_split over all years)")
    if pruning is None:
        print("   not measured: load_hupd has no columns= keyword in this checkout")
        rows.append(("cache bytes all fields / pruned", "not measured", f">= {TARGET_PRUNING:g}x", None))
    else:
        full, pruned = pruning["variants"]["all fields"], pruning["variants"]["pruned"]
        print(f"   columns={PRUNED_COLUMNS} stores {', '.join(pruned['columns'])}")
        for name, r in (("all fields", full), (f"columns={PRUNED_COLUMNS}", pruned)):
            print(
                f"   {name:>58}: {_mb(r['cache_bytes'] / r['rows'] * 1000)} ({r['rows']} rows, {_mb(r['cache_bytes'])})"
            )
        print("   mean bytes per application by field (all fields):")
        fields = sorted(full["fields"].items(), key=lambda kv: -kv[1])
        print(
            "   " + ", ".join(f"{name} {n / 1000:.1f} KB" if n >= 1000 else f"{name} {n:.0f} B" for name, n in fields)
        )
        ratio = (full["cache_bytes"] / full["rows"]) / (pruned["cache_bytes"] / pruned["rows"])
        rows.append(
            ("cache bytes all fields / pruned", f"{ratio:.1f}x", f">= {TARGET_PRUNING:g}x", ratio >= TARGET_PRUNING)
        )

    print("\n3. build time of all 15 years from local files (best of the runs)")
    if parallel is None:
        print("   not measured: load_hupd has no num_proc= keyword in this checkout")
        rows.append(("build time num_proc=1 / num_proc=2", "not measured", f">= {TARGET_PARALLEL:g}x", None))
    else:
        found = parallel["variants"]
        one, two = found["num_proc=1"], found["num_proc=2"]
        if one["order"] != two["order"] or found.get("num_proc=1, pruned", {}).get("order") != found.get(
            "num_proc=2, pruned", {}
        ).get("order"):
            raise SystemExit("num_proc=2 gave other rows or another order than num_proc=1")
        for name, r in found.items():
            runs = ", ".join(f"{t:.2f}" for t in r["times"])
            print(
                f"   {name}: {r['seconds']:.2f} s (runs: {runs} s; {r['rows']} rows); best run's CPU time"
                f" {r['cpu']:.2f} s = {r['cpu'] / r['seconds']:.2f} cores busy on average"
            )
        busy = one["cpu"] / one["seconds"]  # one process inflates on a second thread: more than one core
        if cpus < 4:
            print(
                f"   one process keeps {busy:.2f} cores busy (it inflates on a second thread), so on {cpus} CPUs two"
                f" processes can be at most {min(cpus, 2 * busy) / busy:.2f}x faster, before any cost of their own;"
                f" the target needs >= 4 CPUs"
            )
        (b1, b5, b15), (a1, a5, a15) = parallel["load"]
        print(f"   load average before {b1:.2f} {b5:.2f} {b15:.2f}, after {a1:.2f} {a5:.2f} {a15:.2f}; {cpus} CPUs")
        ratio = one["seconds"] / two["seconds"]
        rows.append(
            (
                "build time num_proc=1 / num_proc=2",
                f"{ratio:.2f}x",
                f">= {TARGET_PARALLEL:g}x",
                ratio >= TARGET_PARALLEL,
            )
        )
        if "num_proc=2, pruned" in found:  # what the recipe's build gains: information beside the target's row
            pruned = found["num_proc=1, pruned"]["seconds"] / found["num_proc=2, pruned"]["seconds"]
            rows.append(("  the same, pruned columns (the recipe)", f"{pruned:.2f}x", "(info)", None))

    print(
        f"\nsummary ({dt.datetime.now().astimezone().isoformat(timespec='seconds')}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {cpus} CPUs)"
    )
    print(f"{'measure':>40} | {'value':>12} | {'target':>8} | result")
    for what, value, target, ok in rows:
        print(f"{what:>40} | {value:>12} | {target:>8} | {verdict(ok)}")
    return all(ok is not False for _, _, _, ok in rows)


def usable_cpus() -> int:
    # The CPUs this process may run on: under `taskset` or a container's CPU set that is fewer than cpu_count().
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"~{QUICK_PER_YEAR} applications a year, one run each")
    parser.add_argument("--per-year", type=int, help=f"applications a year (default {PER_YEAR})")
    parser.add_argument("--repeat", type=int, help="runs per measurement, best kept (default 5; 1 quick)")
    parser.add_argument("--workdir", type=Path, help="where the fixture and scratch go (default: a temp dir)")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "A", "B", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, a, b, scratch = args.worker
        print(json.dumps(WORKERS[kind](a, b, scratch)))
        return 0

    per_year = args.per_year or (QUICK_PER_YEAR if args.quick else PER_YEAR)
    repeat = args.repeat or (1 if args.quick else 5)
    keywords = load_keywords()
    workdir = Path(tempfile.mkdtemp(prefix="hupd-scale-", dir=args.workdir))
    try:
        start = time.perf_counter()
        files = run_worker("make", str(workdir / "fixture"), str(per_year), workdir)
        print(f"generated the fixture in {time.perf_counter() - start:.0f} s", flush=True)
        sizes = member_sizes(Path(files["archive"]))
        hub = measure_hub(files, workdir, repeat)
        print("part 1 done", flush=True)
        pruning = parallel = None
        if "columns" in keywords:
            pruning = measure_builds(files, workdir, {"all fields": {}, "pruned": {"columns": PRUNED_COLUMNS}}, 1)
            print("part 2 done", flush=True)
        if "num_proc" in keywords:
            variants = {"num_proc=1": {"num_proc": 1}, "num_proc=2": {"num_proc": 2}}
            if "columns" in keywords:  # also as the recipe builds: only the columns its task reads
                variants |= {f"{k}, pruned": {**v, "columns": PRUNED_COLUMNS} for k, v in variants.items()}
            parallel = measure_builds(files, workdir, variants, repeat)
            print("part 3 done", flush=True)
        ok = report(files, sizes, hub, pruning, parallel)
        if args.quick:
            print(
                "(--quick: tar headers and start-up costs dominate at these sizes; the targets are for the full run)"
            )
            ok = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
