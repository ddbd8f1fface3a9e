"""The study report: one builder and one schema for `fedcare simulate` and `fedcare run` (README documents it).

`build_report` takes what only the caller knows (the evaluator's view in simulation, the
coordinator's aggregates in deployment) and reads everything else from the run record, so both
paths write the same keys. `write_report` writes `report.json`, the self-contained `report.html`
people read (`fedcare.report_html`), `summary.txt` and the run's privacy summary (`privacy.json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from fedcare.errors import FedcareError
from fedcare.run_record import RunRecord
from fedcare.study import Study


class StudyStoppedEarly(FedcareError):
    """The run ended before its planned training rounds (the report says which ran, and why it stopped)."""

    exit_code = 4


def check_completed(report: dict) -> None:
    """Raise `StudyStoppedEarly` if the report's run stopped early (its commands exit non-zero)."""
    outcome = report.get("outcome") or {}
    if not outcome.get("completed", False):
        why = outcome.get("stopped") or "the run did not record its end"
        raise StudyStoppedEarly(f"study stopped early: {why}; {outcome.get('rounds_aggregated', 0)} of "
                                f"{outcome.get('rounds_planned', '?')} training rounds aggregated (report written)")


def privacy_targets(study: Study) -> dict[str, Any]:
    """The study's per-site privacy targets, as every report and package states them."""
    return {
        "target_epsilon": study.privacy.epsilon,
        "delta": study.privacy.delta,
        "clipping_norm": study.privacy.clipping_norm,
        "accountant": study.privacy.accountant,
    }


def scaling_report(record: RunRecord) -> dict[str, Any]:
    """The feature scaling the run used: federated (pooled statistics, recorded by the run) or the spec's."""
    study = record.study()
    return {
        "method": "federated" if record.scaling() is not None else "spec",
        "features": {f.name: {"center": round(f.center, 6), "scale": round(f.scale, 6)} for f in study.features},
    }


def build_report(
    record: RunRecord,
    *,
    sites: list[dict],
    final: dict,
    baseline: dict,
    export: dict,
    wall_seconds: float,
    sites_note: str | None = None,
    ground_truth_auc: float | None = None,
) -> dict[str, Any]:
    """The report of the run in `record` (schema in README). Keyword arguments are the caller's view:
    per-site rows, the final model's metrics, the centralized baseline and the exported models."""
    study = record.study()
    report: dict[str, Any] = {
        "study": study.name,
        "study_hash": study.hash,
        "secure_aggregation": True,  # there is no other path: the strategy refuses anything but a SecAgg+ sum
        "secure_aggregation_parameters": asdict(study.secure_aggregation),
        "model": asdict(study.model),
        "strategy": asdict(study.strategy),
        "outcome": asdict(outcome) if (outcome := record.outcome()) is not None else None,
        "rounds": record.rounds(),
        "sites": sites,
    }
    if sites_note:
        report["sites_note"] = sites_note
    report.update({"final": final, "baseline_centralized": baseline})
    if ground_truth_auc is not None:
        report["ground_truth_auc"] = ground_truth_auc
    report.update({
        "export": export,
        "scaling": scaling_report(record),
        "privacy": privacy_targets(study),
        "wall_seconds": round(wall_seconds, 2),
    })
    return report


def write_report(record: RunRecord, report: dict) -> None:
    """`report.json`, `report.html` (self-contained: opens from an email attachment), the readable
    `summary.txt`, and `privacy.json` (targets and per-site spend where known)."""
    from fedcare.report_html import render_report

    (record.path / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (record.path / "report.html").write_text(render_report(report), encoding="utf-8")
    (record.path / "summary.txt").write_text(summary_text(report), encoding="utf-8")
    spent = [{"name": s["name"], "epsilon": s.get("epsilon"), "delta": s.get("delta")} for s in report["sites"]]
    record.write_privacy({**report["privacy"], "sites": spent, "note": report.get("sites_note", "")})


def _fmt(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_text(report: dict) -> str:
    lines = [
        f"fedcare study {report['study']} ({report['study_hash'][:12]}…), secure aggregation: "
        f"{'on' if report['secure_aggregation'] else 'OFF'}",
        "",
        "round  test AUC  loss",
    ]
    lines += [f"{r['round']:>5}  {_fmt(r['auc'], '.4f'):>8}  {_fmt(r['loss'], '.4f')}"
              + ("" if r.get("aggregated", True) else f"   no aggregate: {r.get('note') or 'unknown'}")
              for r in report["rounds"]]
    outcome = report.get("outcome") or {}
    if outcome:
        state = "completed" if outcome["completed"] else f"STOPPED EARLY: {outcome['stopped']}"
        lines += ["", f"study {state}; {outcome['rounds_aggregated']} of {outcome['rounds_planned']} training rounds aggregated"]
    lines += ["", f"{'site':<14} {'rows':>6} {'epsilon':>8} {'delta':>8} {'AUC':>6}"]
    lines += [
        f"{s['name']:<14} {_fmt(s.get('train_rows'), 'd'):>6} {_fmt(s['epsilon'], '.3f'):>8} {s['delta']:>8.0e} {_fmt(s['auc'], '.3f'):>6}"
        for s in report["sites"]
    ]
    if report.get("sites_note"):
        lines.append(f"({report['sites_note']})")
    final, export = report["final"], report["export"]
    lines += [
        "",
        f"final global model: AUC {_fmt(final['auc'], '.4f')}, accuracy {_fmt(final.get('accuracy'), '.4f')}"
        + (f" on {final['test_rows']} test rows" if final.get("test_rows") else ""),
        f"centralized non-private baseline: AUC {_fmt(report['baseline_centralized']['auc'], '.4f')}"
        + (f" ({baseline['epochs']} epochs); trained to convergence: AUC {_fmt(baseline['converged_auc'], '.4f')}"
           if "converged_auc" in (baseline := report["baseline_centralized"]) else "")
        + (f"; ground-truth ceiling: AUC {report['ground_truth_auc']:.4f}" if "ground_truth_auc" in report else ""),
    ]
    if mean := report.get("site_mean"):
        lines.insert(-2, f"mean over {mean['sites']} sites: AUC {_fmt(mean['auc'], '.4f')}, balanced accuracy "
                         f"{_fmt(mean['balanced_accuracy'], '.4f')}, Brier {_fmt(mean['brier'], '.4f')}")
    if "onnx" in export:
        lines += [
            f"ONNX fp32: {export['onnx']} ({export['bytes_fp32']} bytes, AUC {_fmt(export['auc_fp32'], '.4f')})",
            f"ONNX int8: {export['onnx_int8']} ({export['bytes_int8']} bytes, AUC {_fmt(export['auc_int8'], '.4f')})",
        ]
    else:
        lines.append(f"no model exported: {export.get('note', 'no round was securely aggregated')}")
    lines.append(f"wall time: {report.get('wall_seconds', 0):.1f} s")
    return "\n".join(lines) + "\n"
