"""A synthetic site's notes and readings files rendered as FHIR R4, beside its coded resources.

`write_fhir_modalities(site_dir, split)` turns `<split>.notes.csv` into `DocumentReference.ndjson`
(every other note's text inline as base64 `data`, the rest as `Binary` resources in `Binary.ndjson`
that the reference points to; `text/plain; charset=utf-8`, plus a PDF attachment the reader must
skip) and `<split>.readings.csv` into device Observations in `Observation.2.ndjson`: steps with an
`effectiveDateTime`, sleep with an `effectivePeriod` ending on the reading's day (the night before),
heart rate as a `component` of a vital-signs panel. The study derives the same features from either
form (`tests/test_notes_streams.py` checks it cell for cell).
"""

from __future__ import annotations

import base64
import csv
import datetime
import json
from pathlib import Path

CATEGORY = {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                        "code": "clinical-note"}]}
NOTE_TYPE = {"coding": [{"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}]}
PANEL = {"coding": [{"system": "http://loinc.org", "code": "85353-1", "display": "Vital signs panel"}]}
UCUM = "http://unitsofmeasure.org"


def _line(resource: dict) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n"


def _document(n: int, pid: str, date: str, text: str) -> tuple[dict, dict | None]:
    data = base64.b64encode(text.encode("utf-8")).decode("ascii")
    attachment: dict = {"contentType": "text/plain; charset=utf-8"}
    binary = None
    if n % 2:
        binary = {"resourceType": "Binary", "id": f"note-{n}", "contentType": "text/plain", "data": data}
        attachment["url"] = f"Binary/note-{n}"
    else:
        attachment["data"] = data
    pdf = {"attachment": {"contentType": "application/pdf", "url": f"Binary/pdf-{n}"}}
    doc = {"resourceType": "DocumentReference", "id": f"doc-{n}", "status": "current", "type": NOTE_TYPE,
           "category": [CATEGORY], "subject": {"reference": f"Patient/{pid}"}, "date": f"{date}T10:30:00Z",
           "content": [pdf, {"attachment": attachment}] if n % 3 == 0 else [{"attachment": attachment}]}
    return doc, binary


def _reading(n: int, row: dict) -> dict:
    pid, time, system, code = row["patient_id"], row["time"], row["system"], row["code"]
    quantity = {"value": float(row["value"]), "unit": row["unit"], "system": UCUM, "code": row["unit"]}
    concept = {"coding": [{"system": system, "code": code}]}
    obs: dict = {"resourceType": "Observation", "id": f"dev-{n}", "status": "final",
                 "subject": {"reference": f"Patient/{pid}"}}
    if code == "8889-8":  # heart rate inside a panel
        obs |= {"code": PANEL, "effectiveDateTime": time if "T" in time else f"{time}T12:00:00Z",
                "component": [{"code": concept, "valueQuantity": quantity}]}
    elif code == "248263006":  # sleep: the night that ended on the reading's day
        end = time[:10]
        start = (datetime.date.fromisoformat(end) - datetime.timedelta(days=1)).isoformat()
        obs |= {"code": concept, "effectivePeriod": {"start": f"{start}T23:10:00Z", "end": f"{end}T06:40:00Z"},
                "valueQuantity": quantity}
    else:
        obs |= {"code": concept, "effectiveDateTime": time, "valueQuantity": quantity}
    return obs


def write_fhir_modalities(site_dir: Path, split: str) -> dict[str, int]:
    """Render `<split>.notes.csv` / `<split>.readings.csv` (when present) into `<site_dir>/<split>/`."""
    out = site_dir / split
    out.mkdir(parents=True, exist_ok=True)
    counts = {"DocumentReference": 0, "Binary": 0, "Observation (device)": 0}
    notes = site_dir / f"{split}.notes.csv"
    if notes.is_file():
        with notes.open(newline="", encoding="utf-8") as src, \
                (out / "DocumentReference.ndjson").open("w", encoding="utf-8") as docs, \
                (out / "Binary.ndjson").open("w", encoding="utf-8") as binaries:
            for n, row in enumerate(csv.DictReader(src)):
                doc, binary = _document(n, row["patient_id"], row["date"], row["text"])
                docs.write(_line(doc))
                counts["DocumentReference"] += 1
                if binary is not None:
                    binaries.write(_line(binary))
                    counts["Binary"] += 1
    readings = site_dir / f"{split}.readings.csv"
    if readings.is_file():
        with readings.open(newline="", encoding="utf-8") as src, \
                (out / "Observation.2.ndjson").open("w", encoding="utf-8") as obs:
            for n, row in enumerate(csv.DictReader(src)):
                obs.write(_line(_reading(n, row)))
                counts["Observation (device)"] += 1
    return counts
