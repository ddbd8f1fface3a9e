"""`report.html`: the study report people read, from `report.json` (any of its three views).

One self-contained file that opens from an email attachment: inline CSS and inline SVG charts
(`fedcare.report_svg`), no script, no font, image, link or any other external reference, and a
Content-Security-Policy that forbids the browser from fetching anything even if one slipped in.
Every string from the report is escaped (site and study names come from files).

Views (`render_report` picks by the report's keys; every optional key may be absent):

- simulation (`fedcare simulate`, the evaluator's view): pooled and per-site ROC, calibration,
  per-site metrics, ε per site from each ledger;
- deployment (`fedcare run`, the coordinator): aggregates only; per-site ε and metrics are not
  known (`sites_note` says so) and the ε chart shows the target alone;
- site (`fedcare report` at a hospital, `"view": "site"`): that site's scores of the served package
  on its own test split, and its own ledger against its policy. Never sent anywhere.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from fedcare import report_svg as charts

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d1d1f; font: 15px/1.45 "Segoe UI", "Helvetica Neue", Arial,
       "DejaVu Sans", sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 28px 32px 40px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e3e3; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.sub { color: #555; margin: 0 0 12px; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 12px; font-weight: 600; font-size: 13px; }
.ok { background: #dff3e6; color: #0b5d2a; } .warn { background: #fdebd3; color: #8a4500; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; margin: 14px 0; }
.tile { border: 1px solid #e3e3e3; border-radius: 8px; padding: 10px 12px; }
.tile .label { color: #555; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.tile .value { font-size: 24px; font-weight: 600; }
.tile .note { color: #6b6b6b; font-size: 12px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 8px; padding: 6px; }
figcaption { color: #555; font-size: 13px; padding: 4px 6px 2px; }
.empty { color: #6b6b6b; padding: 40px 12px; text-align: center; }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin: 6px 0 10px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #ececec; vertical-align: top; }
th { background: #f7f7f9; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.card { display: grid; grid-template-columns: 1fr 1fr; gap: 0 24px; }
.note { color: #555; font-size: 13px; }
code, .mono { font-family: "DejaVu Sans Mono", Consolas, monospace; font-size: 12.5px; word-break: break-all; }
svg text { font-family: "Segoe UI", "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; fill: #222; }
svg .tick { font-size: 11px; fill: #444; } svg .small { font-size: 9.5px; } svg .muted { fill: #777; }
svg .axis-label { font-size: 12px; } svg .legend { font-size: 11.5px; }
svg .chart-title { font-size: 14px; font-weight: 600; }
@media print { body { background: #fff; } main { padding: 0; } figure, table { break-inside: avoid; } }
@media (max-width: 800px) { .grid, .card { grid-template-columns: 1fr; } }
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'"
VIEWS = {
    "simulation": "simulation on one machine; the evaluator's view (it may read every site's files)",
    "deployment": "deployment: the coordinator's report; it holds aggregates only (no per-site numbers, no patient data)",
    "site": "site report: computed at this hospital from its own data and ledger; it stays here, never sent anywhere",
}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _num(value: Any, spec: str = ".4f") -> str:
    if _missing(value):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    return _e(format(value, spec))


def _plain(value: Any) -> str:
    """Any JSON value, for people (generic tables: strategy, secure aggregation, export ...)."""
    if _missing(value):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:g}")
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value) or "—"
    if isinstance(value, dict):
        return "; ".join(f"{_e(k)}: {_plain(v)}" for k, v in value.items()) or "—"
    return _e(value)


def view_of(report: dict) -> str:
    if report.get("view") == "site":
        return "site"
    known = any(not _missing(s.get("auc")) or not _missing(s.get("epsilon")) for s in report.get("sites") or [])
    return "simulation" if known or not report.get("sites_note") else "deployment"


def _table(headers: list[tuple[str, bool]], rows: list[list[str]]) -> str:
    """`headers`: (text, numeric) pairs; cells are already escaped HTML."""
    head = "".join(f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>" for h, num in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>"
                                    for c, (_, num) in zip(row, headers)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(mapping: dict, labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    rows = [[_e(labels.get(k, k.replace("_", " "))), _plain(v)] for k, v in mapping.items()]
    return _table([("parameter", False), ("value", False)], rows) if rows else '<p class="note">not recorded</p>'


def _figure(svg: str | None, caption: str, missing: str) -> str:
    body = svg if svg is not None else f'<div class="empty">{_e(missing)}</div>'
    return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"


# -- sections ---------------------------------------------------------------------------------------


def _header(report: dict, view: str) -> str:
    title = report.get("study", "fedcare study")
    if view == "site":
        title = f"{report.get('site', 'site')} — {title}"
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="sub">fedcare study report · {_e(VIEWS[view])}</p>']
    outcome = report.get("outcome")
    if outcome:
        done = outcome.get("completed", False)
        state = "completed" if done else f"stopped early: {outcome.get('stopped') or 'the run did not record why'}"
        parts.append(f'<p><span class="badge {"ok" if done else "warn"}">{_e(state)}</span> '
                     f'{_e(outcome.get("rounds_aggregated", "?"))} of {_e(outcome.get("rounds_planned", "?"))} '
                     f'training rounds securely aggregated'
                     + (f" · finished {_e(outcome['finished'])}" if outcome.get("finished") else "") + "</p>")
    elif view != "site":
        parts.append('<p><span class="badge warn">outcome not recorded</span></p>')
    if report.get("created"):
        parts.append(f'<p class="note">computed {_e(report["created"])}</p>')
    return "".join(parts)


def _tile(label: str, value: str, note: str = "") -> str:
    return (f'<div class="tile"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
            + (f'<div class="note">{_e(note)}</div>' if note else "") + "</div>")


def _headline(report: dict, view: str) -> str:
    final = report.get("final") or {}
    where = {"simulation": "all sites' test rows pooled", "deployment": "federated: sum over the sites",
             "site": "this site's test split"}[view]
    tiles = [_tile("AUC", _num(final.get("auc"), ".3f"), where)]
    for key, label, spec, note in (("accuracy", "accuracy", ".3f", "threshold 0.5"),
                                   ("balanced_accuracy", "balanced accuracy", ".3f", "mean of sensitivity and specificity"),
                                   ("brier", "Brier score", ".4f", "lower is better; 0.25 = coin"),
                                   ("loss", "log-loss", ".4f", ""), ("test_rows", "test rows", "d", ""),
                                   ("prevalence", "prevalence", ".1%", "share of positive outcomes")):
        if not _missing(final.get(key)):
            tiles.append(_tile(label, _num(final[key], spec), note))
    baseline = (report.get("baseline_centralized") or {}).get("auc")
    if not _missing(baseline):
        tiles.append(_tile("centralized baseline AUC", _num(baseline, ".3f"), "pooled data, no privacy"))
    if not _missing(report.get("ground_truth_auc")):
        tiles.append(_tile("ceiling AUC", _num(report["ground_truth_auc"], ".3f"), "the generator's true risk"))
    if not _missing(final.get("auc_int8_served")):
        tiles.append(_tile("served int8 AUC", _num(final["auc_int8_served"], ".3f"), "the quantized model serve runs"))
    federated = (report.get("federated") or {}).get("federated_auc")
    if not _missing(federated):
        tiles.append(_tile("federated AUC", _num(federated, ".3f"), "all sites, as the coordinator measured it"))
    mean = report.get("site_mean") or {}
    if not _missing(mean.get("auc")):
        tiles.append(_tile("mean site AUC", _num(mean["auc"], ".3f"), "unweighted mean over the sites"))
    text = f'<p class="note">{_e(final["source"])}</p>' if final.get("source") else ""
    return "<h2>Final model</h2>" + f'<div class="tiles">{"".join(tiles)}</div>' + text


def _roc(report: dict, view: str) -> str:
    final = report.get("final") or {}
    curves = []
    roc = final.get("roc") or {}
    if roc.get("fpr"):
        label = {"site": "this site", "deployment": "all sites (federated)"}.get(view, "all sites pooled")
        curves.append((f"{label} (AUC {_num(final.get('auc'), '.3f')})", roc["fpr"], roc["tpr"]))
    if view != "site":
        for site in report.get("sites") or []:
            site_roc = site.get("roc") or {}
            if site_roc.get("fpr"):
                curves.append((f"{site.get('name', '?')} (AUC {_num(site.get('auc'), '.3f')})", site_roc["fpr"],
                               site_roc["tpr"]))
    return _figure(charts.roc_chart(curves) if curves else None,
                   "Sensitivity against 1 − specificity over every threshold; the area under it is the AUC.",
                   "No ROC points in this report (written by an older fedcare, or no model was evaluated).")


def _calibration(report: dict) -> str:
    table = (report.get("final") or {}).get("calibration") or []
    return _figure(charts.calibration_chart(table) if table else None,
                   "Observed outcome rate per predicted-risk bin (10 bins); on the diagonal, a predicted 30% "
                   "risk comes true 30% of the time. Numbers: rows per bin.",
                   "No calibration table in this report.")


def _rounds(report: dict) -> str:
    rounds = [r for r in report.get("rounds") or [] if isinstance(r.get("round"), int)]
    if not rounds:
        return ""
    numbers = [r["round"] for r in rounds]
    auc = charts.rounds_chart("auc-rounds", "Federated test AUC per round", "AUC", numbers,
                              [r.get("auc") for r in rounds], charts.PALETTE[0])
    loss = charts.rounds_chart("loss-rounds", "Federated test log-loss per round", "log-loss", numbers,
                               [r.get("loss") for r in rounds], charts.PALETTE[1])
    lost = [f"round {r['round']}: {r.get('note') or 'no aggregate'}" for r in rounds if not r.get("aggregated", True)]
    note = f'<p class="note">Rounds without a secure aggregate: {_e("; ".join(lost))}.</p>' if lost else ""
    return ("<h2>Training rounds</h2><div class=\"grid\">"
            + _figure(auc, "The global model after each round, scored inside secure aggregation on every site's "
                           "test split (the coordinator sees only the sum).", "")
            + _figure(loss, "Mean log-loss of the same evaluation.", "") + "</div>" + note)


def _epsilon(report: dict, view: str) -> str:
    privacy = report.get("privacy") or {}
    target = privacy.get("target_epsilon")
    lines = [("study target", float(target))] if not _missing(target) else []
    if view == "site":
        budget = (report.get("policy") or {}).get("max_epsilon_per_study")
        if not _missing(budget):
            lines.append(("this site's policy, per study", float(budget)))
    sites = report.get("sites") or []
    bars = [(str(s.get("name", "?")), None if _missing(s.get("epsilon")) else float(s["epsilon"])) for s in sites]
    unknown = "kept at the site" if view == "deployment" else "not recorded"
    chart = charts.epsilon_chart(bars, lines, unknown_text=unknown) if bars or lines else None
    note = report.get("sites_note") or ""
    caption = ("ε spent by each site on this study (smaller is more private) against the study's target"
               + (" and the site's own budget" if view == "site" else "") + "."
               + (f" {note}." if note and view == "deployment" else ""))
    return _figure(chart, caption, "No privacy figures in this report.")


def _ledger(report: dict) -> str:
    ledger = report.get("ledger")
    if not ledger:
        return ""
    rows = ledger.get("rounds") or []
    chart = None
    if rows:
        lines = [("this site's policy, per study", float(b))] if not _missing(
            b := (report.get("policy") or {}).get("max_epsilon_per_study")) else []
        chart = charts.rounds_chart("ledger", "ε of this study after each round trained here", "ε (cumulative)",
                                    list(range(1, len(rows) + 1)), [r.get("epsilon_study") for r in rows],
                                    charts.PALETTE[2], x_label="round trained at this site (all runs)", lines=lines)
    table = _table([("run", True), ("round", True), ("time (UTC)", False), ("σ", True), ("ε study", True),
                    ("ε lifetime", True)],
                   [[_num(r.get("run_id"), "d"), _num(r.get("round"), "d"), _e(r.get("time", "")),
                     _num(r.get("noise_multiplier"), ".4f"), _num(r.get("epsilon_study"), ".4f"),
                     _num(r.get("epsilon_lifetime"), ".4f")] for r in rows])
    policy = report.get("policy") or {}
    summary = (f'<p>Ledger <code>{_e(ledger.get("path", ""))}</code>: {_e(ledger.get("entries", 0))} entries, chain '
               f'{"verified" if ledger.get("verified") else "NOT verified"}. This study: ε '
               f'{_num(ledger.get("epsilon_spent"), ".4f")} spent of {_num(policy.get("max_epsilon_per_study"), "g")}; '
               f'lifetime ε {_num(ledger.get("epsilon_lifetime"), ".4f")} of {_num(policy.get("max_epsilon_lifetime"), "g")}.</p>')
    figure = (_figure(chart, "Cumulative ε of this study after each round this site trained, against its policy.", "")
              if chart else '<p class="note">No round of this study was trained at this site.</p>')
    return ("<h2>This site's privacy ledger</h2>" + summary + '<div class="grid">' + figure
            + "<div><h3>Site policy</h3>" + _pairs(policy) + "</div></div>" + "<h3>Rounds of this study</h3>" + table)


SITE_COLUMNS = (("train_rows", "train rows", "d"), ("test_rows", "test rows", "d"), ("epsilon", "ε spent", ".3f"),
                ("epsilon_target", "ε target", "g"), ("rounds_trained", "rounds trained", "d"), ("auc", "AUC", ".3f"),
                ("accuracy", "accuracy", ".3f"), ("balanced_accuracy", "balanced acc.", ".3f"),
                ("brier", "Brier", ".4f"))


def _sites(report: dict, view: str) -> str:
    sites = report.get("sites") or []
    if not sites:
        return ""
    columns = [c for c in SITE_COLUMNS if any(not _missing(s.get(c[0])) for s in sites)]
    rows = [[_e(s.get("name", "?"))] + [_num(s.get(key), spec) for key, _, spec in columns] for s in sites]
    mean = report.get("site_mean") or {}
    if mean:
        rows.append(["<em>mean over sites</em>"] + [_num(mean.get(key), spec) if key in mean else ""
                                                    for key, _, spec in columns])
    headers = [("site", False)] + [(label, True) for _, label, _ in columns]
    note = f'<p class="note">{_e(report["sites_note"])}.</p>' if report.get("sites_note") else ""
    title = "This site" if view == "site" else "Sites"
    return f"<h2>{title}</h2>" + _table(headers, rows) + note + (
        '<p class="note">Counts only: no row or patient value is in this report.</p>')


def _model_card(report: dict) -> str:
    model = report.get("model") or {}
    left = ["<h3>Study</h3>", _table([("item", False), ("value", False)], [
        ["name", _e(report.get("study", "?"))],
        ["study hash", f'<span class="mono">{_e(report.get("study_hash", "?"))}</span>'],
        ["outcome", "in the coordinator's report (a site sees its own part only)" if report.get("view") == "site"
         else _outcome_text(report.get("outcome"))],
        *([["wall time", _e(f"{report['wall_seconds']:.1f} s")]] if isinstance(report.get("wall_seconds"), (int, float)) else []),
    ])]
    if model:
        hidden = model.get("hidden") or []
        layers = " → ".join(str(h) for h in hidden) if hidden else "none"
        left += ["<h3>Model</h3>", _table([("item", False), ("value", False)], [
            ["kind", _e(model.get("kind", "?"))], ["hidden layers", _e(layers)],
            *[[_e(k), _plain(v)] for k, v in model.items() if k not in ("kind", "hidden")]])]
    if report.get("strategy"):
        left += ["<h3>Aggregation strategy</h3>", _pairs(report["strategy"])]
    right = []
    if report.get("privacy"):
        right += ["<h3>Differential privacy (per site, DP-SGD)</h3>", _pairs(report["privacy"])]
    secure = "SecAgg+: every update and evaluation was securely aggregated" if report.get("secure_aggregation") \
        else "not recorded"
    right += ["<h3>Secure aggregation</h3>", f"<p>{_e(secure)}</p>",
              _pairs(report["secure_aggregation_parameters"]) if report.get("secure_aggregation_parameters") else ""]
    if report.get("export"):
        right += ["<h3>Exported model</h3>", _pairs(report["export"])]
    if report.get("package"):
        right += ["<h3>Model package</h3>", _pairs(report["package"])]
    scaling = report.get("scaling") or {}
    features = scaling.get("features") or {}
    tail = ""
    if features:
        rows = [[_e(name), _num(v.get("center"), ".4g"), _num(v.get("scale"), ".4g")] for name, v in features.items()]
        tail = (f"<h3>Features and scaling ({_e(scaling.get('method', '?'))})</h3>"
                f'<p class="note">Model input = (value − center) / scale, clipped; {len(rows)} features.</p>'
                + _table([("feature", False), ("center", True), ("scale", True)], rows))
    return ('<h2>Model card</h2><div class="card"><div>' + "".join(left) + "</div><div>" + "".join(right)
            + "</div></div>" + tail)


def _outcome_text(outcome: dict | None) -> str:
    if not outcome:
        return "not recorded"
    if outcome.get("completed"):
        return _e(f"completed: {outcome.get('rounds_aggregated')} of {outcome.get('rounds_planned')} rounds")
    return _e(f"stopped early ({outcome.get('stopped') or 'reason not recorded'}): "
              f"{outcome.get('rounds_aggregated')} of {outcome.get('rounds_planned')} rounds")


def render_report(report: dict) -> str:
    """The whole page for one report dict (study, deployment or site view)."""
    view = view_of(report)
    body = [_header(report, view), _headline(report, view),
            "<h2>Discrimination and calibration</h2>", '<div class="grid">', _roc(report, view),
            _calibration(report), "</div>", _rounds(report)]
    body += ["<h2>Privacy</h2>", '<div class="grid">', _epsilon(report, view), "<div>"]
    privacy = report.get("privacy") or {}
    body.append(f'<p>Each site trains with DP-SGD (clipping norm {_num(privacy.get("clipping_norm"), "g")}, '
                f'δ {_num(privacy.get("delta"), "g")}, {_e(privacy.get("accountant", "?"))} accountant) and records '
                f'every round in its own tamper-evident ledger before its update leaves; a site refuses a round that '
                f'would exceed its own policy.</p>')
    if view == "deployment":
        body.append('<p class="note">The coordinator does not know any site\'s ε: each site holds its ledger. '
                    'A site sees its own with <code>fedcare report</code> or <code>fedcare privacy report</code>.</p>')
    body += ["</div></div>", _ledger(report), _sites(report, view), _model_card(report),
             '<p class="note">Generated by fedcare from report.json. Self-contained: no script and no external '
             'resource; safe to open offline or from an email attachment.</p>']
    title = f"{report.get('study', 'fedcare')} — fedcare report"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(body) + "</main></body></html>\n")
