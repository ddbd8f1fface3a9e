"""The study model: a small MLP, or logistic regression (no hidden layer), that outputs one risk logit per patient."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedcare.study import Study


class RiskMLP(nn.Module):
    """Inputs `Study.input_names` (scaled), output one logit (shape [batch])."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build_model(study: Study) -> RiskMLP:
    """The study's model with its deterministic initial weights (`model.seed`)."""
    generator_state = torch.random.get_rng_state()
    # the CPU generator only: torch.manual_seed also queues a lazy CUDA seeding with its formatted
    # stack on every call (~150 µs here, and a list that grows with every model built)
    torch.random.default_generator.manual_seed(study.model.seed)
    try:
        return RiskMLP(len(study.input_names), study.model.hidden)
    finally:
        torch.random.set_rng_state(generator_state)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Model parameters as float32 arrays, in `state_dict` order."""
    return [v.detach().cpu().numpy().astype(np.float32, copy=True) for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by `get_weights` (shapes are checked)."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} weight arrays, got {len(weights)}")
    state = {k: torch.from_numpy(np.asarray(w, dtype=np.float32).copy()) for k, w in zip(keys, weights)}
    model.load_state_dict(state, strict=True)


def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Risk probabilities for scaled inputs."""
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x))).numpy()
