"""The study report: one schema for `fedcare simulate` and `fedcare run` (README documents it)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(out: Path, report: dict) -> None:
    """`<out>/report.json` and the readable `<out>/summary.txt`."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "summary.txt").write_text(summary_text(report), encoding="utf-8")


def summary_text(report: dict) -> str:
    lines = [
        f"fedcare study {report['study']} ({report['study_hash'][:12]}…), secure aggregation: "
        f"{'on' if report['secure_aggregation'] else 'OFF'}",
        "",
        "round  test AUC  loss",
    ]
    lines += [f"{r['round']:>5}  {r['auc']:.4f}    {r['loss']:.4f}" for r in report["rounds"]]
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
        + (f"; ground-truth ceiling: AUC {report['ground_truth_auc']:.4f}" if "ground_truth_auc" in report else ""),
        f"ONNX fp32: {export['onnx']} ({export['bytes_fp32']} bytes, AUC {_fmt(export['auc_fp32'], '.4f')})",
        f"ONNX int8: {export['onnx_int8']} ({export['bytes_int8']} bytes, AUC {_fmt(export['auc_int8'], '.4f')})",
        f"wall time: {report.get('wall_seconds', 0):.1f} s",
    ]
    return "\n".join(lines) + "\n"
