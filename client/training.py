"""Local DP-SGD training of the study model (Poisson sampling; fast closed-form clipping, or Opacus).

`train_round` is the one entry point: it runs the round's planned epochs of DP-SGD
with the schedule's noise multiplier, drawing the noise and the batches from a cryptographic
source (`privacy/noise.py`). The study's model family (Linear/ReLU stacks, logistic included)
trains through `client.fast_dp` (per-sample norms in closed form; equal to Opacus' update, tested);
any other model through Opacus' ghost clipping. What the round costs is charged before, by the site's ledger
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
from privacy.accounting import DPSchedule, batches_per_epoch
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

    def __getitems__(self, indices: list[int] | np.ndarray) -> list[torch.Tensor]:
        idx = torch.from_numpy(indices) if isinstance(indices, np.ndarray) else torch.as_tensor(indices, dtype=torch.long)
        return [self.x[idx], self.y[idx]]

    def batch_arrays(self, indices: np.ndarray) -> list[np.ndarray]:
        """The batch as numpy arrays (the fast path computes in numpy; a numpy gather is cheaper)."""
        return [self.x.numpy().take(indices, axis=0), self.y.numpy().take(indices)]


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


def train_round(
    study: Study,
    model: RiskMLP,
    x: np.ndarray,
    y: np.ndarray,
    schedule: DPSchedule,
    *,
    fast: bool | None = None,
) -> int:
    """Run one round of DP-SGD in place on `model`; returns the number of noisy steps taken.
    `fast`: None picks the fast path when it supports the model (`client.fast_dp.supports`);
    False forces Opacus (the reference); True requires the fast path."""
    from client.fast_dp import supports

    use_fast = supports(model) if fast is None else fast
    rows = BatchIndexedRows(x, y)
    if abs(1.0 / batches_per_epoch(len(rows), study.training.batch_size) - schedule.sample_rate) > 1e-12:
        raise ValueError("the site's training data changed size since the study's DP schedule was planned")
    source = CryptoGaussian()  # fresh key from os.urandom: noise and sampling nobody can predict
    step = _fast_steps(study, model, rows, schedule, source) if use_fast else _opacus_steps(study, model, rows, schedule, source)
    gather = rows.batch_arrays if use_fast else rows.__getitems__
    steps = 0
    # Poisson sampling as Opacus' sampler does it (rate q = 1 / batches per epoch, 1 / q steps per
    # epoch), drawn from the cryptographic source; rows are gathered in one indexing operation.
    for _ in range(schedule.steps_per_round):
        indices = source.poisson_batch(len(rows), schedule.sample_rate)
        if len(indices) == 0:
            # Probability (1 - q)^n, i.e. about e^-batch_size: negligible for the study's
            # batch sizes. The step is skipped; the ledger charged the planned steps anyway.
            continue
        step(*gather(indices))
        steps += 1
    return steps


def _fast_steps(study: Study, model: RiskMLP, rows: BatchIndexedRows, schedule: DPSchedule, source: CryptoGaussian):
    """The step function of the fast path (`client.fast_dp.FastDPSGD`), FedProx's term included."""
    from client.fast_dp import FastDPSGD

    optimizer = make_optimizer(study, model)
    trainer = FastDPSGD(model, optimizer, noise_multiplier=schedule.noise_multiplier,
                        max_grad_norm=study.privacy.clipping_norm,
                        expected_batch_size=int(len(rows) * schedule.sample_rate), noise=source)
    model.train()
    mu = float(study.strategy.proximal_mu or 0.0)
    anchors = {id(p): p.detach().clone() for p in model.parameters()} if mu > 0 else {}  # w_global

    def proximal(p: torch.Tensor, grad: torch.Tensor) -> None:
        grad.add_(p.detach() - anchors[id(p)], alpha=mu)  # after clipping and noise: costs no privacy

    return lambda xb, yb: trainer.step(xb, yb, extra=proximal if mu > 0 else None)


@_opacus_notices_silenced()
def _opacus_steps(study: Study, model: RiskMLP, rows: BatchIndexedRows, schedule: DPSchedule, source: CryptoGaussian):
    """The step function of the Opacus path (ghost clipping), FedProx's term included."""
    engine = PrivacyEngine(accountant=schedule.accountant)
    loader = DataLoader(rows, batch_size=study.training.batch_size, shuffle=True, collate_fn=_batch_as_is)
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
    use_crypto_noise(optimizer, source)
    private_model.train()
    mu = float(study.strategy.proximal_mu or 0.0)
    anchors = [p.detach().clone() for p in optimizer.params] if mu > 0 else []  # w_global, this round's start

    @_opacus_notices_silenced()
    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(private_model(xb), yb)  # logits and labels are both [B]
        loss.backward()
        if mu > 0:
            _proximal_step(optimizer, anchors, mu)
        else:
            optimizer.step()

    return step


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
    torch.random.default_generator.manual_seed(seed)  # CPU only (see fedcare.model.build_model)
    loader = make_loader(x, y, study.training.batch_size)
    optimizer = make_optimizer(study, model)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(xb), yb).backward()
            optimizer.step()
