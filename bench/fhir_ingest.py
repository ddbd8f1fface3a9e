"""FHIR R4 bulk-NDJSON ingest on one core: fedcare's streaming reader vs the `fhir.resources` models.

    .venv/bin/python bench/fhir_ingest.py [--resources 1000000] [--workdir DIR] [--sample 100000] [--repeats 3]

A synthetic export of ~`--resources` resources (Patient, Observation, Condition,
MedicationRequest, Encounter; one `<Type>.ndjson` file per type, as a bulk-data export names
them) is rendered once with `simulations.fhir_cohorts.write_fhir_split`, patient block by
patient block, and cached under `--workdir` (default: the system temp directory); a rerun
reuses it. Subsets, made in the same pass:

* `sample`: the first patients, all their resources, ~`--sample` resources (same mix);
* `first-quarter`: the first patients, all their resources, ~1/4 of the export;
* `first-quarter-padded`: the same resources, each with a narrative (`text.div`) that brings
  the bytes up to the whole export's: same patients and facts as `first-quarter`, 4x the bytes.

Every measurement runs in its own subprocess pinned to CPU 0 (`sched_setaffinity`, BLAS/OMP
threads 1), which reports wall and CPU time, its peak RSS (`ru_maxrss`, imports included), and
the growth while reading: the peak (VmHWM, reset through /proc/self/clear_refs after the
imports) minus the RSS after the imports, as JSON. Measured:

* fedcare `client.fhir.read_site_fhir` on the whole export (resources/s, peak RSS);
* baseline: every line validated by its `fhir.resources` R4B model (`model_validate_json`,
  the class picked once per file from its resource-type name), i.e. what a pipeline built on
  the reference models does before it can derive anything; it is slow, so it runs on the
  `sample` subset, and fedcare runs on that same subset for the ratio (repeats interleaved,
  medians). `orjson.loads` of every line is shown as the parse floor;
* memory: fedcare's RSS growth while reading the export, `first-quarter` (1/4 of the patients
  and of the bytes) and `first-quarter-padded` (1/4 of the patients, all of the bytes): it must
  follow patients, not file size.

The machine is shared and noisy: rates are given on wall time and on the child's CPU time
(`process_time`), and the load average is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUDY = ROOT / "studies" / "depression-risk.toml"
CHUNK = 1000  # patients rendered per write_fhir_split call
PER_PATIENT_GUESS = 38.0  # resources per synthetic patient, refined after the first block
GOAL_RATE = 50_000  # resources/s on one core
GOAL_RSS_MB = 1024
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


# --- the synthetic export (parent process) -------------------------------------------------------


def _append(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(src_dir.glob("*.ndjson")):
        with src.open("rb") as i, (dst_dir / src.name).open("ab") as o:
            shutil.copyfileobj(i, o, 1 << 20)


def _describe(directory: Path) -> dict:
    counts, size = {}, 0
    for path in sorted(directory.glob("*.ndjson")):
        with path.open("rb") as handle:
            counts[path.stem] = sum(1 for _ in handle)
        size += path.stat().st_size
    return {"dir": str(directory), "resources": sum(counts.values()), "by_type": counts, "bytes": size,
            "patients": counts.get("Patient", 0)}


def build_export(workdir: Path, target: int, sample: int, seed: int) -> dict:
    """Render (or reuse) the export and its subsets; returns the manifest."""
    root = workdir / f"fedcare-fhir-ingest-{target}-seed{seed}"
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    import numpy as np

    from client.data import read_site_csv
    from fedcare.study import load_study
    from simulations.cohorts import SMALLEST_SITE, write_cohorts
    from simulations.fhir_cohorts import write_fhir_split

    if root.exists():
        shutil.rmtree(root)  # a half-built export from an interrupted run
    root.mkdir(parents=True)
    study = load_study(STUDY)
    t0 = time.perf_counter()
    needed = math.ceil(target / 28)  # more rows than needed, so the export never runs short
    write_cohorts(study, root / "csv", hospitals=1, seed=seed, size_scale=needed / SMALLEST_SITE)
    site = root / "csv" / "hospital-01"
    tables = [read_site_csv(study, site / f"{split}.csv") for split in ("train", "test")]
    rows = np.concatenate([t.features for t in tables])
    labels = np.concatenate([t.labels for t in tables]).astype(np.int64)
    parts = {"export": target, "first-quarter": target // 4, "sample": sample}
    total, patients, per_patient = 0, 0, PER_PATIENT_GUESS
    while total < target:
        if patients >= len(rows):
            raise RuntimeError(f"ran out of synthetic rows at {total} resources")
        boundary = min(b for b in parts.values() if b > total)
        n = max(1, min(CHUNK, len(rows) - patients, math.ceil((boundary - total) / per_patient)))
        chunk = root / "_chunk"
        summary = write_fhir_split(study, study.mapping, rows[patients:patients + n], labels[patients:patients + n],
                                   chunk, seed=[seed, 29], first_patient=patients)
        for name, limit in parts.items():
            if total < limit:
                _append(chunk, root / name)
        shutil.rmtree(chunk)
        total += sum(summary["resources"].values())
        patients += n
        per_patient = total / patients
        print(f"  rendered {patients} patients, {total} resources ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    shutil.rmtree(root / "csv")
    index = study.mapping.index_date
    manifest = {
        "seed": seed,
        "today": (index + datetime.timedelta(days=study.mapping.label.window_days_after or 0)).isoformat(),
        "render_seconds": round(time.perf_counter() - t0, 1),
        **{name: _describe(root / name) for name in parts},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_padded(manifest: dict) -> dict:
    """`first-quarter-padded` (once): every resource of `first-quarter` with a narrative `text`."""
    if "first-quarter-padded" in manifest:
        return manifest
    import orjson

    source, whole = manifest["first-quarter"], manifest["export"]
    out = Path(source["dir"]).parent / "first-quarter-padded"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    sentence = "Narrative generated by the source system from the structured data of this resource. "
    pad = max(0, round((whole["bytes"] - source["bytes"]) / source["resources"]) - 100)
    div = '<div xmlns="http://www.w3.org/1999/xhtml"><p>' + (sentence * (pad // len(sentence) + 1))[:pad] + "</p></div>"
    for path in sorted(Path(source["dir"]).glob("*.ndjson")):
        with path.open("rb") as i, (out / path.name).open("wb") as o:
            for line in i:
                obj = orjson.loads(line)
                head = {"resourceType": obj.pop("resourceType"), "id": obj.pop("id", None)}
                o.write(orjson.dumps({**head, "text": {"status": "generated", "div": div}, **obj}) + b"\n")
    manifest["first-quarter-padded"] = _describe(out)
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- measurements (child processes) --------------------------------------------------------------


def _rss_mb() -> float:
    """Peak RSS of this process so far (imports included), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.M).group(1)) / 1024


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS, MB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_mb("VmRSS")


def _child(kind: str, directory: Path, today: str) -> dict:
    os.sched_setaffinity(0, {0})
    files = sorted(directory.glob("*.ndjson"))
    if kind == "fedcare":
        from client.fhir import read_site_fhir
        from fedcare.study import load_study

        study = load_study(STUDY)
        rss0 = _reset_peak()
        w0, c0 = time.perf_counter(), time.process_time()
        table = read_site_fhir(study, study.mapping, directory, today=datetime.date.fromisoformat(today))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        report = table.report
        lines = sum(report.resources_read.values()) + sum(report.ignored.values())
        extra = {"patients_loaded": report.rows_loaded, "quarantined": sum(report.quarantined.values())}
    elif kind == "fhir.resources":
        from fhir.resources.R4B import get_fhir_model_class

        models = {path: get_fhir_model_class(path.stem) for path in files}
        rss0 = _reset_peak()
        lines = errors = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for path in files:
            model = models[path]
            with path.open("rb") as handle:
                for line in handle:
                    lines += 1
                    try:
                        model.model_validate_json(line)
                    except ValueError:  # pydantic.ValidationError
                        errors += 1
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        extra = {"validation_errors": errors}
    elif kind == "orjson":
        import orjson

        rss0 = _reset_peak()
        lines = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for path in files:
            with path.open("rb") as handle:
                for line in handle:
                    orjson.loads(line)
                    lines += 1
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        extra = {}
    else:
        raise SystemExit(f"unknown measurement {kind}")
    return {"kind": kind, "dir": str(directory), "resources": lines, "wall": wall, "cpu": cpu,
            "rss_imports_mb": rss0, "growth_mb": _status_mb("VmHWM") - rss0, "rss_peak_mb": _rss_mb(), **extra}


def measure(kind: str, part: dict, today: str) -> dict:
    env = {**os.environ, **THREAD_ENV}
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, part["dir"], "--today", today],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["resources"] != part["resources"]:
        raise RuntimeError(f"{kind} saw {result['resources']} resources in {part['dir']}, expected {part['resources']}")
    return result


# --- report --------------------------------------------------------------------------------------


def _rate(runs: list[dict], clock: str = "wall") -> float:
    return statistics.median(r["resources"] / r[clock] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resources", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=100_000, help="resources in the baseline's subset")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--today", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]), args.today)))
        return

    m = add_padded(build_export(args.workdir, args.resources, args.sample, args.seed))
    export, sample, first, padded = m["export"], m["sample"], m["first-quarter"], m["first-quarter-padded"]
    today = m["today"]
    print(f"export: {export['dir']}  ({m['render_seconds']} s to render, cached)")
    print(f"  {export['resources']:,} resources, {export['bytes'] / 1e6:,.0f} MB, {export['patients']:,} patients: "
          + ", ".join(f"{k} {v:,}" for k, v in export["by_type"].items()))
    for name, part in (("sample", sample), ("first-quarter", first), ("first-quarter-padded", padded)):
        print(f"  {name:20s}: {part['resources']:,} resources, {part['bytes'] / 1e6:,.0f} MB, {part['patients']:,} patients")
    load0 = os.getloadavg()[0]
    print(f"one core (CPU 0), 1 thread, {args.repeats} interleaved repeats, medians; today={today}; load average {load0:.1f}")

    full, small, base, floor = [], [], [], []
    for _ in range(args.repeats):
        full.append(measure("fedcare", export, today))
        small.append(measure("fedcare", sample, today))
        base.append(measure("fhir.resources", sample, today))
        floor.append(measure("orjson", sample, today))
    first_run = measure("fedcare", first, today)
    padded_run = measure("fedcare", padded, today)
    load1 = os.getloadavg()[0]

    f_wall, f_cpu = _rate(full), _rate(full, "cpu")
    s_wall, s_cpu = _rate(small), _rate(small, "cpu")
    b_wall, b_cpu = _rate(base), _rate(base, "cpu")
    peak = max(r["rss_peak_mb"] for r in full)
    print(f"load average at the end {load1:.1f}")
    print()
    print("resources/s                              wall        CPU")
    print(f"fedcare read_site_fhir, whole export : {f_wall:10,.0f} {f_cpu:10,.0f}   "
          f"({statistics.median(r['wall'] for r in full):.1f} s wall; {full[0]['patients_loaded']:,} patients loaded, "
          f"{full[0]['quarantined']} quarantined)")
    print(f"fedcare read_site_fhir, sample       : {s_wall:10,.0f} {s_cpu:10,.0f}")
    print(f"fhir.resources R4B, sample           : {b_wall:10,.0f} {b_cpu:10,.0f}   "
          f"(model_validate_json per line; {base[0]['validation_errors']} validation errors)")
    print(f"orjson.loads per line, sample        : {_rate(floor):10,.0f} {_rate(floor, 'cpu'):10,.0f}   (parse floor)")
    print(f"ratio fedcare / fhir.resources       : {s_wall / b_wall:9.1f}x {s_cpu / b_cpu:9.1f}x  (same sample: "
          f"{sample['resources']:,} resources of the first {sample['patients']:,} patients)")
    print()
    print("peak RSS (MB)                        process   growth while reading")
    for name, runs in (("fedcare, whole export", full), ("fhir.resources, sample", base), ("orjson, sample", floor)):
        print(f"{name:36s} {max(r['rss_peak_mb'] for r in runs):7,.0f}   {statistics.median(r['growth_mb'] for r in runs):+7,.1f}")
    print()
    print("memory: fedcare's RSS growth while reading")
    runs = (("export", export, full[0]), ("first-quarter", first, first_run), ("first-quarter-padded", padded, padded_run))
    for name, part, run in runs:
        print(f"  {name:20s}: {run['growth_mb']:+7.1f} MB for {part['patients']:6,} patients, {part['bytes'] / 1e6:5,.0f} MB of NDJSON "
              f"({run['growth_mb'] * 1024 / part['patients']:.2f} KB per patient)")
    g_full, g_first, g_padded = full[0]["growth_mb"], first_run["growth_mb"], padded_run["growth_mb"]
    print(f"  export / first-quarter             : growth {g_full / g_first:.2f}x, patients "
          f"{export['patients'] / first['patients']:.2f}x, bytes {export['bytes'] / first['bytes']:.2f}x")
    print(f"  first-quarter-padded / first-quarter: growth {g_padded / g_first:.2f}x, patients "
          f"{padded['patients'] / first['patients']:.2f}x, bytes {padded['bytes'] / first['bytes']:.2f}x")
    print()
    print(f"goal >= {GOAL_RATE:,} resources/s on one core: wall {'met' if f_wall >= GOAL_RATE else 'NOT met'} "
          f"({f_wall:,.0f}/s), CPU time {'met' if f_cpu >= GOAL_RATE else 'NOT met'} ({f_cpu:,.0f}/s)")
    print(f"goal peak RSS <= 1 GB: {'met' if peak <= GOAL_RSS_MB else 'NOT met'} ({peak:,.0f} MB)")

if __name__ == "__main__":
    main()
