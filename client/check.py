"""`fedcare data check`: what a site's export yields for a study, in counts only.

The same check runs in `fedcare node start` before the node joins. It never prints a value
or a patient identifier: records read, patients built, records quarantined by reason (with
line numbers), missingness per feature, unit conversions applied (FHIR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.data import SiteDataError, SiteTable, read_split, split_source
from client.database import DatabaseSource
from fedcare.study import Study


@dataclass(frozen=True)
class DataCheck:
    """The check's report (`text`), whether the export is unusable, and why (`problems`: one line each,
    naming the file), with the warnings a usable export still gets."""

    text: str
    fatal: bool
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _split_paths(path: Path) -> list[tuple[str, str, Path]]:
    """(split name, format, path) for a site directory (train and test) or a single split."""
    if path.is_file():
        fmt = {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if fmt is None:
            raise SiteDataError(f"{path}: expected a .csv or .parquet file, a FHIR directory or a site directory")
        return [(path.stem, fmt, path)]
    if not path.is_dir():
        raise SiteDataError(f"{path}: site data directory not found")
    if any(path.glob("*.ndjson")) or any(path.glob("*.ndjson.gz")) or any(path.glob("*.json")):
        return [(path.name, "fhir", path)]
    return [(split, *split_source(path, split)) for split in ("train", "test")]


def _missingness(study: Study, table: SiteTable) -> list[str]:
    rows = max(table.report.rows_loaded, 1)
    lines = []
    for feature in study.features:
        missing = table.report.missing_by_feature.get(feature.name, 0)
        if missing:
            lines.append(f"    {feature.name:<28} {missing:>8} of {rows} ({100 * missing / rows:.1f} %), policy '{feature.missing}'")
    return ["  missing values by feature:", *lines] if lines else ["  no missing values"]


def check_site_export(study: Study, path: str | Path, *, source: DatabaseSource | None = None) -> DataCheck:
    """Read every split under `path` (or of the database `source`) against `study`; fatal when a split
    yields no usable patient."""
    from client.database import is_database_path

    path = Path(path)
    if source is not None or is_database_path(path):
        return check_database_site(study, path, source=source)
    try:
        splits = _split_paths(path)
    except SiteDataError as err:
        return DataCheck(f"fedcare data check: {err}", fatal=True, problems=(str(err),))
    out = [f"study {study.name} ({study.hash[:12]}…), {len(study.features)} features"]
    problems: list[str] = []
    warnings: list[str] = []
    for split, fmt, split_path in splits:
        out.append(f"\n[{split}] {fmt}: {split_path}")
        try:
            table = read_split(study, fmt, split_path)
        except SiteDataError as err:
            out.append(f"  FATAL: {err}")
            problems.append(str(err))
            continue
        report = table.report
        out.append(f"  records read {report.rows_read}, patients built {report.rows_loaded}, "
                   f"quarantined {sum(report.quarantined.values())}, label prevalence {table.labels.mean():.3f}")
        out += ["  " + line for line in report.summary().splitlines()[1:]]
        out += _missingness(study, table)
        if split == "train" and len(set(table.labels.tolist())) < 2:
            only = int(table.labels[0])
            warnings.append(f"every training row has {study.label.name} = {only} ("
                            f"{'no cases' if only == 0 else 'no controls'}): this site's updates cannot teach the "
                            "model to tell the two apart; it still takes part (and spends budget) if it joins")
            out.append(f"  WARNING: {warnings[-1]}")
    return DataCheck("\n".join(out), bool(problems), tuple(problems), tuple(warnings))


def check_database_site(study: Study, path: Path, *, source: DatabaseSource | None = None) -> DataCheck:
    """The same check against the site's database (`client/database_site.py`): which concepts each rule
    found, records read and used per table, quarantines by reason, missingness; counts only."""
    from client.database import Split, load_database_source
    from client.database_site import read_database_site

    try:
        source = source or load_database_source(path)
        out = [f"study {study.name} ({study.hash[:12]}…), {len(study.features)} features",
               f"database: {source.describe()}, read-only role {source.user} checked"]
        tables = read_database_site(study, path, source=source)
    except SiteDataError as err:
        return DataCheck(f"fedcare data check: {err}", fatal=True, problems=(str(err),))
    warnings: list[str] = []
    report = tables[Split.TRAIN].report
    concepts = getattr(report, "concepts", [])
    if concepts:
        out += ["  concepts found in the vocabulary (per rule):", *(f"    {line}" for line in concepts)]
    for line in getattr(report, "not_found", []):
        warnings.append(f"{line}: the feature will hold no record of it")
        out.append(f"  WARNING: {warnings[-1]}")
    for split in Split:
        table = tables[split]
        out.append(f"\n[{split.value}] {source.kind.value}")
        rep = table.report
        out.append(f"  patients read {rep.rows_read}, built {rep.rows_loaded}, quarantined {sum(rep.quarantined.values())}, "
                   f"label prevalence {table.labels.mean():.3f}")
        out += ["  " + line for line in rep.summary().splitlines()[1:]]
        out += _missingness(study, table)
    labels = tables[Split.TRAIN].labels
    if len(set(labels.tolist())) < 2:
        warnings.append(f"every training row has {study.label.name} = {int(labels[0])}: this site's updates cannot "
                        "teach the model to tell cases from controls")
        out.append(f"  WARNING: {warnings[-1]}")
    return DataCheck("\n".join(out), False, (), tuple(warnings))
