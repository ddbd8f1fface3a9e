"""The kernel every party shares: what a study *is* and what crosses a boundary.

- `study` (with its FHIR `mapping` as a leaf module): the study file, validated, and its hash;
- `features`: the spec's scaling, imputation and missing indicators (identical at every site);
- `model`, `metrics`: the study's model and how it is scored;
- `protocol`, `contribution`: what the ServerApp and the ClientApp say to each other (round
  phases, refusals, the layout and arithmetic of the masked vector);
- `run_record`: the folder a run writes (the study as run, checkpoints, round log) and `report`;
- `files`, `errors`: durable writes, key files, the TOML reader; the one error base.

Nothing here imports Flower, the site's data readers, deployment or the command line.
"""

from pathlib import Path

__version__ = "0.1.0"

# The Flower App: the folder with pyproject.toml ([tool.flwr.app]) and the app's packages.
APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = APP_DIR / "studies" / "depression-risk.toml"
