"""report.html, the study report people read: rendered by a real headless Chromium from a real simulation.

The page must be self-contained (it opens from an email attachment): the test renders it, decodes the
screenshot (PNG, stdlib only) to check the plots are drawn, parses the SVG charts, checks the DOM for
any external reference, and reads Chromium's network log for any request the page made (a control
page with external references proves the log check sees them). Unit tests render hostile, partial
and deployment-style reports.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedcare.report_html import render_report

from .conftest import ROOT

WINDOW = (1200, 3000)
_RUN: dict[str, Path] = {}


def simulated_run(base: Path) -> Path:
    """One real `fedcare simulate` run folder for this session (shared with tests/test_site_report.py)."""
    if "run" not in _RUN:
        out = base / "report-sim" / "run"
        cmd = [sys.executable, "-m", "cli", "simulate", "--hospitals", "3", "--rounds", "2", "--epsilon", "4",
               "--size-scale", "0.5", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _RUN["run"] = out
    return _RUN["run"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return simulated_run(tmp_path_factory.getbasetemp())


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={cwd / 'profile'}", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    proc = subprocess.run([exe, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# -- PNG (stdlib): RGB(A), 8 bits, not interlaced — what Chromium writes -------------------------------


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, unfiltered pixel rows concatenated)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat += chunk
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    out, prev = bytearray(), bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bpp, bytes(out)


def region_stats(png: tuple[int, int, int, bytes], x0: int, y0: int, x1: int, y1: int,
                 series: tuple[int, int, int] = (0x00, 0x72, 0xB2)) -> tuple[int, int, int]:
    """(distinct colours, non-white pixels, pixels near the `series` colour — the first data series'
    blue) in a rectangle of the screenshot."""
    width, _, bpp, pixels = png
    colours, ink, drawn = set(), 0, 0
    for y in range(y0, y1):
        row = pixels[(y * width + x0) * bpp : (y * width + x1) * bpp]
        for i in range(0, len(row), bpp):
            rgb = row[i : i + 3]
            colours.add(rgb)
            ink += rgb != b"\xff\xff\xff"
            drawn += abs(rgb[0] - series[0]) + abs(rgb[1] - series[1]) + abs(rgb[2] - series[2]) < 60
    return len(colours), ink, drawn


# -- the HTML ------------------------------------------------------------------------------------------


class Page(HTMLParser):
    """Charts (svg data-chart) with their polylines' point counts; every attribute that could fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, list[int]] = {}
        self.chart: str | None = None
        self.references: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        values = dict(attrs)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data", "background", "formaction"):
                self.references.append((tag, name, value or ""))
            if name == "style" and value and "url(" in value:
                self.references.append((tag, name, value))
        if tag == "svg" and "data-chart" in values:
            self.chart = values["data-chart"]
            self.charts[self.chart] = []
        if tag == "polyline" and self.chart and values.get("class") == "series":
            self.charts[self.chart].append(len(values.get("points", "").split()))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "svg":
            self.chart = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def assert_self_contained(html: str) -> None:
    page = parse(html)
    assert page.references == [], page.references  # no src/href of any kind: nothing to fetch
    assert not page.tags & {"script", "link", "img", "iframe", "object", "embed", "base", "form"}
    assert "url(" not in page.style and "@import" not in page.style
    for needle in ("http://", "https://", 'src="//', "href=\"//"):
        assert needle not in html, needle


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked the network for (requests on behalf of the file:// document),
    from Chromium's net log; Chromium's own background traffic has another isolation key."""
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    found = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start and "file://" in (params.get("network_isolation_key", "") + params.get("site_for_cookies", "")):
            found.append(params["url"])
    return [url for url in found if not url.startswith(("file:", "about:", "data:"))]


# -- the real report, in a real browser --------------------------------------------------------------------


def test_the_simulation_writes_report_html_and_chromium_renders_its_charts(run, tmp_path):
    html_path = run / "report.html"
    assert html_path.is_file()
    html = html_path.read_text(encoding="utf-8")
    report = json.loads((run / "report.json").read_text())
    page = parse(html)
    assert set(page.charts) >= {"roc", "calibration", "auc-rounds", "loss-rounds", "epsilon"}
    assert len(page.charts["roc"]) == 1 + len(report["sites"])  # pooled and one per site
    assert all(points >= 5 for points in page.charts["roc"]), page.charts["roc"]
    assert page.charts["calibration"] and page.charts["calibration"][0] >= 3
    assert page.charts["auc-rounds"] == [2] and page.charts["loss-rounds"] == [2]
    assert html.count('class="bar"') >= len(report["sites"])
    for site in report["sites"]:
        assert f"{site['name']} (AUC {site['auc']:.3f})" in html  # the per-site legend
    assert f"all sites pooled (AUC {report['final']['auc']:.3f})" in html
    assert report["study_hash"] in html and "fedavg" in html and "max weight" in html
    assert_self_contained(html)

    shot = tmp_path / "out.png"
    chromium("--screenshot=" + str(shot), f"--window-size={WINDOW[0]},{WINDOW[1]}", html_path.as_uri(), cwd=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 20_000
    png = decode_png(shot.read_bytes())
    assert png[:2] == WINDOW
    colours, ink, _ = region_stats(png, 0, 0, WINDOW[0], WINDOW[1])
    assert colours > 50 and ink > 0.05 * WINDOW[0] * WINDOW[1]
    # the charts' row (ROC left, calibration right) sits in the first screenful: in both, the first
    # series (pooled ROC curve; observed calibration points and line) is drawn in its colour
    for x0, x1 in ((60, 560), (620, 1120)):
        colours, ink, drawn = region_stats(png, x0, 520, x1, 900)
        assert colours > 30 and ink > 5_000 and drawn > 400, (x0, colours, ink, drawn)


def test_the_page_requests_nothing_from_the_network(run, tmp_path):
    html_path = run / "report.html"
    dom = chromium("--dump-dom", html_path.as_uri(), cwd=tmp_path).stdout
    assert "<svg" in dom and 'data-chart="roc"' in dom
    assert_self_contained(dom)
    log = tmp_path / "net.json"
    chromium(f"--log-net-log={log}", "--net-log-capture-mode=Everything", "--dump-dom", html_path.as_uri(), cwd=tmp_path)
    assert page_requests(log) == []
    # the check sees a page's requests when there are some: a control page with external references
    control, control_log = tmp_path / "control.html", tmp_path / "control-net.json"
    control.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/probe.png">'
                       '<link rel="stylesheet" href="https://example.invalid/x.css">')
    chromium(f"--log-net-log={control_log}", "--net-log-capture-mode=Everything", "--dump-dom", control.as_uri(),
             cwd=tmp_path)
    assert set(page_requests(control_log)) == {"http://127.0.0.1:9/probe.png", "https://example.invalid/x.css"}


# -- unit: hostile, partial, deployment-style reports ---------------------------------------------------------


def _minimal(**extra) -> dict:
    return {"study": "s", "study_hash": "ab" * 32, "secure_aggregation": True, "rounds": [], "sites": [],
            "final": {"auc": None}, **extra}


def test_every_string_is_escaped():
    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    report = _minimal(
        study=hostile,
        outcome={"completed": False, "rounds_planned": 3, "rounds_aggregated": 1, "stopped": hostile, "finished": ""},
        sites=[{"name": hostile, "epsilon": 1.0, "auc": 0.7, "train_rows": 10, "test_rows": 5,
                "roc": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]}}],
        rounds=[{"round": 1, "aggregated": False, "auc": None, "loss": None, "note": hostile}],
        strategy={"name": hostile, hostile: hostile},
        scaling={"method": "spec", "features": {hostile: {"center": 1.0, "scale": 2.0}}},
        privacy={"target_epsilon": 3.0, "delta": 1e-5, "clipping_norm": 1.0, "accountant": hostile},
        export={"note": hostile},
    )
    html = render_report(report)
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = parse(html)
    assert page.references == [] and "script" not in page.tags and "img" not in page.tags


def test_a_report_without_the_optional_fields_renders():
    html = render_report(_minimal())
    assert html.startswith("<!DOCTYPE html>") and "No ROC points in this report" in html
    assert "No calibration table" in html and "outcome not recorded" in html
    html = render_report({"study": "old", "study_hash": "cd" * 32, "secure_aggregation": True,
                          "rounds": [{"round": 1, "aggregated": True, "auc": 0.6, "loss": 0.5}],
                          "sites": [{"name": "a", "epsilon": 1.2, "delta": 1e-5, "auc": 0.61}],
                          "final": {"auc": 0.6, "accuracy": 0.7}, "baseline_centralized": {"auc": 0.65}})
    assert 'data-chart="auc-rounds"' in html and 'data-chart="epsilon"' in html and "0.650" in html
    assert_self_contained(html)


def test_a_deployment_report_shows_the_target_and_the_notes_not_per_site_numbers():
    note = "per-site ε and metrics stay at the sites (each site's accountant); the coordinator sees aggregates only"
    report = _minimal(
        sites=[{"name": n, "epsilon": None, "epsilon_target": 3.0, "delta": 1e-5, "auc": None} for n in ("north", "south")],
        sites_note=note,
        outcome={"completed": True, "rounds_planned": 2, "rounds_aggregated": 2, "stopped": "", "finished": "t"},
        rounds=[{"round": 1, "aggregated": True, "auc": 0.6, "loss": 0.5}, {"round": 2, "aggregated": True, "auc": 0.62, "loss": 0.49}],
        final={"auc": 0.62, "loss": 0.49, "accuracy": None, "test_rows": 100,
               "roc": {"fpr": [0.0, 0.2, 0.5, 1.0], "tpr": [0.0, 0.5, 0.8, 1.0]},
               "calibration": [{"predicted": 0.1, "observed": 0.12, "rows": 80}, {"predicted": 0.6, "observed": 0.5, "rows": 20}],
               "source": "federated evaluation of the final global model (sum of the sites' score histograms)"},
        baseline_centralized={"auc": None, "note": "the coordinator holds no patient data"},
        privacy={"target_epsilon": 3.0, "delta": 1e-5, "clipping_norm": 1.0, "accountant": "prv"},
    )
    html = render_report(report)
    assert "deployment: the coordinator" in html and note.replace("'", "&#x27;") in html
    assert "kept at the site" in html and "study target: ε 3" in html
    assert "all sites (federated) (AUC 0.620)" in html
    page = parse(html)
    assert page.charts["roc"] == [4] and page.charts["calibration"] == [2]
    assert 'class="bar"' not in html.split('data-chart="epsilon"')[1].split("</svg>")[0]  # no per-site ε bars


def test_the_coordinator_report_carries_the_pooled_roc_and_calibration_from_the_summed_histograms(tmp_path):
    import numpy as np

    from deploy.report import final_model_metrics
    from fedcare.metrics import AUC_BINS, calibration_from_histogram, roc_from_histogram
    from fedcare.run_record import RoundEntry, RunRecord

    record = RunRecord(tmp_path)
    record.write_rounds([RoundEntry(round=1, aggregated=True, sites_aggregated=3, auc=0.7, loss=0.5,
                                    sites_evaluated=3, seconds=1.0)])
    assert "roc" not in final_model_metrics(record)  # an older run: no histogram recorded
    rng = np.random.default_rng(0)
    histogram = np.stack([rng.integers(0, 3, AUC_BINS), rng.integers(0, 2, AUC_BINS)])
    record.save_evaluation(1, histogram)
    round_, again = record.evaluation_histogram()
    assert round_ == 1 and (again == histogram).all() and again.dtype == np.int64
    final = final_model_metrics(record)
    assert final["roc"] == roc_from_histogram(histogram) and final["calibration"] == calibration_from_histogram(histogram)
    assert final["test_rows"] == int(histogram.sum()) and final["auc"] == 0.7
    record.save_evaluation(0, histogram)  # a histogram of another model than the final one is not used
    assert "roc" not in final_model_metrics(record)
