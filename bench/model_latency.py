"""Why the served default model is measured: per-call latency of the package's fp32, int8 (static QDQ)
and a16w8 models in ONNX Runtime, with the service's session options, at batch 1, 64 and 1,024, all in
the same run; and which default `fedcare serve` chooses (`inference.default_model`).

    .venv/bin/python bench/model_latency.py [--repeats 5]

The package is the one bench/serve_latency.py builds (the study's MLP). Models are timed interleaved
(a noisy moment hits each alike), best of `--repeats`, and each quantized model is also shown as a
ratio of fp32's time at the same batch (> 1: slower than fp32). The optimized graph's kernels are
printed, which is where the difference comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_latency import build_fixture  # noqa: E402


def main() -> int:
    import onnx
    import onnxruntime as ort

    from inference.commands import load_service
    from inference.default_model import probe_rows
    from inference.model import INPUT_NAME, OUTPUT_NAME, session_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedcare-model-latency-") as tmp:
        package, kit, _ = build_fixture(Path(tmp))
        service = load_service(package, kit)
        files = {name: package / entry["file"] for name, entry in json.loads((package / "manifest.json").read_text())["models"].items()}
        for name, path in files.items():
            options = session_options()
            options.optimized_model_filepath = str(Path(tmp) / f"{name}.opt.onnx")
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            kernels = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
            print(f"{name:<6} optimized graph: {len(kernels)} kernels: {', '.join(kernels)}")
        sessions = {name: ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                    for name, path in files.items()}
        rows = probe_rows(service.inputs, rows=1024)
        print(f"\n{'batch':>5}  " + "  ".join(f"{n + ' µs':>10}" for n in sessions) + "  " +
              "  ".join(f"{n + '/fp32':>11}" for n in sessions if n != "fp32"))
        for batch in (1, 64, 1024):
            x = rows[:batch]
            usable = {n: s for n, s in sessions.items() if not isinstance(s.get_inputs()[0].shape[0], int) or s.get_inputs()[0].shape[0] == batch}
            calls = max(50, 3000 // batch)
            best = {n: float("inf") for n in usable}
            for _ in range(args.repeats):
                for name, session in usable.items():
                    for _ in range(10):
                        session.run([OUTPUT_NAME], {INPUT_NAME: x})
                    started = time.perf_counter()
                    for _ in range(calls):
                        session.run([OUTPUT_NAME], {INPUT_NAME: x})
                    best[name] = min(best[name], (time.perf_counter() - started) / calls * 1e6)
            cells = "  ".join(f"{best[n]:>10.1f}" if n in best else f"{'-':>10}" for n in sessions)
            ratios = "  ".join(f"{best[n] / best['fp32']:>11.2f}" if n in best else f"{'-':>11}" for n in sessions if n != "fp32")
            print(f"{batch:>5}  {cells}  {ratios}")
        print(f"\nfedcare serve would start with: {service.default_choice.describe()}")
        print(f"largest |Δ risk| vs fp32 on the probe rows: {service.default_choice.max_delta_risk}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
