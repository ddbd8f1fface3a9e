"""Local DP-SGD training of the study model (Opacus, ghost clipping, Poisson sampling).

`train_round` is the one entry point: it runs the round's planned epochs of DP-SGD
with the schedule's noise multiplier, drawing the noise from a cryptographic source
(`privacy/noise.py`). What the round costs is charged before, by the site's ledger
(`privacy/budget.py`), from the same schedule.

FedProx (`strategy.proximal_mu` = μ > 0) adds the proximal term μ/2 ‖w − w_global‖² to the local
objective, w_global being the model the round started from. Its gradient μ (w − w_global) does not
depend on the data, so it is added to each step's gradient *after* Opacus clipped, noised and
averaged the data term (`DPOptimizer.pre_step`, which also records the step with the accountant,
once), then the original optimizer steps: the privacy cost, ε and the ledger are those of plain
DP-SGD. Clipping it with the data gradients instead would make the term compete for the clipping
norm and bias it for nothing.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.model import RiskMLP
from fedcare.study import Study
from privacy.accounting import DPSchedule
from privacy.noise import CryptoGaussian, use_crypto_noise

# glibc re-mmaps large per-sample buffers every step without these (see DESIGN.md).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))


class BatchIndexedRows(Dataset):
    """Rows fetched a whole batch at a time (`__getitems__`), not collated row by row."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [self.x[idx], self.y[idx]]


def _batch_as_is(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


def make_loader(x: np.ndarray, y: np.ndarray, batch_size: int) -> DataLoader:
    return DataLoader(BatchIndexedRows(x, y), batch_size=batch_size, shuffle=True, collate_fn=_batch_as_is)


def make_optimizer(study: Study, model: nn.Module) -> torch.optim.Optimizer:
    """The study's local optimizer (a fresh one each round: no state crosses rounds)."""
    t = study.training
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=t.learning_rate, momentum=t.momentum)


@contextlib.contextmanager
def _opacus_notices_silenced() -> Iterator[None]:
    """Opacus' notices about its non-cryptographic RNG and ghost-clipping hooks (the RNG choice
    is documented in README, Privacy); usable as a decorator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        yield


@_opacus_notices_silenced()
def train_round(
    study: Study,
    model: RiskMLP,
    x: np.ndarray,
    y: np.ndarray,
    schedule: DPSchedule,
) -> int:
    """Run one round of DP-SGD in place on `model`; returns the number of noisy steps taken."""
    engine = PrivacyEngine(accountant=schedule.accountant)
    loader = make_loader(x, y, study.training.batch_size)
    if abs(1.0 / len(loader) - schedule.sample_rate) > 1e-12:
        raise ValueError("the site's training data changed size since the study's DP schedule was planned")
    optimizer = make_optimizer(study, model)
    private_model, optimizer, criterion, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=nn.BCEWithLogitsLoss(),
        noise_multiplier=schedule.noise_multiplier,
        max_grad_norm=study.privacy.clipping_norm,
        poisson_sampling=True,
        grad_sample_mode="ghost",
    )
    source = CryptoGaussian()  # fresh key from os.urandom: noise and sampling nobody can predict
    use_crypto_noise(optimizer, source)
    private_model.train()
    mu = float(study.strategy.proximal_mu or 0.0)
    anchors = [p.detach().clone() for p in optimizer.params] if mu > 0 else []  # w_global, this round's start
    rows: BatchIndexedRows = loader.dataset
    steps = 0
    # Poisson sampling as Opacus' sampler does it (rate q = 1 / batches per epoch, 1 / q steps per
    # epoch), drawn from the cryptographic source; rows are gathered in one indexing operation.
    for _ in range(schedule.steps_per_round):
        indices = source.poisson_batch(len(rows), schedule.sample_rate)
        if not indices:
            # Probability (1 - q)^n, i.e. about e^-batch_size: negligible for the study's
            # batch sizes. The step is skipped; the ledger charged the planned steps anyway.
            continue
        xb, yb = rows.__getitems__(indices)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(private_model(xb), yb)  # logits and labels are both [B]
        loss.backward()
        if mu > 0:
            _proximal_step(optimizer, anchors, mu)
        else:
            optimizer.step()
        steps += 1
    return steps


@torch.no_grad()
def _proximal_step(optimizer: DPOptimizer, anchors: list[torch.Tensor], mu: float) -> None:
    """`DPOptimizer.step` with μ (w − w_global) added to the privatized gradient: `pre_step` clips,
    noises and scales the data gradient and calls the accountant's hook (once per step, as `step`
    would); then the proximal gradient, which touches no data, and the original optimizer's step."""
    if not optimizer.pre_step():
        return  # a skipped step (gradient accumulation): `step` would not step either
    for p, anchor in zip(optimizer.params, anchors, strict=True):
        p.grad.add_(p.detach() - anchor, alpha=mu)
    optimizer.original_optimizer.step()


def train_plain(study: Study, model: RiskMLP, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> None:
    """Non-private SGD with the study's hyper-parameters (the centralized baseline)."""
    torch.manual_seed(seed)
    loader = make_loader(x, y, study.training.batch_size)
    optimizer = make_optimizer(study, model)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
