"""Server optimizers: how the round's aggregate delta Δ_t moves the global model.

The coordinator sees only the SecAgg+ sum, so every optimizer here is a function of the
example-weighted mean delta Δ_t (`fedcare.contribution` decodes it) and of its own state, never
of a single site's update. Each is a small pure-numpy object:

    new_weights = optimizer.step(weights, delta)
    state = optimizer.state()          # {name: ndarray}: what a resumed run needs to go on exactly
    optimizer.load_state(state)

| name        | update (arrays elementwise; Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2) |
|-------------|-----------------------------------------------------------------------------------------------|
| `ServerSGD`      | x ← x + η Δ_t (FedAvg, FedProx; η = 1 is plain FedAvg)                                  |
| `ServerMomentum` | v_t = β v_{t-1} + Δ_t; x ← x + η v_t (FedAvgM, Hsu et al. 2019; Flower's FedAvgM)       |
| `ServerAdagrad`  | m_t = β1 m_{t-1} + (1-β1) Δ_t; v_t = v_{t-1} + Δ_t²; x ← x + η m_t / (√v_t + τ)          |
| `ServerAdam`     | m_t as above; v_t = β2 v_{t-1} + (1-β2) Δ_t²; same step                                  |
| `ServerYogi`     | m_t as above; v_t = v_{t-1} − (1-β2) Δ_t² sign(v_{t-1} − Δ_t²); same step                 |

Conventions (and where Flower 1.42's strategies differ):
- m and v start at 0 (`initial_v = 0.0`), as Flower's FedOpt strategies do (`np.zeros_like`); the paper
  asks for v_{-1} ≥ τ², which `initial_v = tau**2` gives. With Flower's default τ (1e-9, Yogi 1e-3)
  and DP-noised deltas (|Δ| ≳ 1e-3) the two differ by less than 1e-6 relative after one round.
- No bias correction, as in the paper's Algorithm 2, Flower's FedYogi and FedAdagrad. Flower's FedAdam
  alone scales η by √(1-β2^(r+1)) / (1-β1^(r+1)) with r the *server* round (which in fedcare also
  counts the statistics round), so fedcare's FedAdam follows the paper instead.
- Arithmetic is float64; the strategy stores the weights it returns as float32 (the model's dtype).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

Arrays = list[NDArray[np.floating]]


class ServerOptimizer(Protocol):
    """What `strategies.fedavg.DeltaFedAvg` needs of a server optimizer."""

    def step(self, weights: Arrays, delta: Arrays) -> Arrays:
        """The next global weights from the current ones and the round's aggregate delta."""
        ...

    def state(self) -> dict[str, NDArray[np.floating]]:
        """The optimizer's state ({} when it has none)."""
        ...

    def load_state(self, state: dict[str, NDArray[np.floating]]) -> None:
        """Take up a `state()` saved with an earlier checkpoint."""
        ...


def _as64(arrays: Arrays) -> list[NDArray[np.float64]]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _check_rate(name: str, value: float, *, low: float = 0.0, high: float | None = None) -> None:
    if not np.isfinite(value) or value < low or (high is not None and value >= high):
        span = f"[{low:g}, {high:g})" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be {span}, got {value}")


class _Stateful:
    """Named lists of arrays (`m`, `v`, ...) saved as `name/index` entries, plus the step count."""

    _slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.steps = 0
        self.moments: dict[str, list[NDArray[np.float64]]] = {}

    def state(self) -> dict[str, NDArray[np.floating]]:
        if not self.steps:
            return {}
        state: dict[str, NDArray[np.floating]] = {"steps": np.array(self.steps, dtype=np.int64)}
        for slot, arrays in self.moments.items():
            state.update({f"{slot}/{i:03d}": a for i, a in enumerate(arrays)})
        return state

    def load_state(self, state: dict[str, NDArray[np.floating]]) -> None:
        if not state:
            self.steps, self.moments = 0, {}
            return
        unknown = {k.split("/")[0] for k in state} - {"steps", *self._slots}
        if unknown or "steps" not in state:
            raise ValueError(f"{type(self).__name__}: not this optimizer's state (entries {sorted(state)})")
        self.steps = int(state["steps"])
        self.moments = {
            slot: [np.asarray(state[k], dtype=np.float64) for k in sorted(k for k in state if k.split("/")[0] == slot)]
            for slot in self._slots
        }

    def _moment(self, slot: str, like: list[NDArray[np.float64]], fill: float = 0.0) -> list[NDArray[np.float64]]:
        found = self.moments.get(slot)
        if found is None:
            return [np.full_like(d, fill) for d in like]
        if [a.shape for a in found] != [d.shape for d in like]:
            raise ValueError(f"{type(self).__name__}: its state {slot!r} does not fit the model's arrays")
        return found


class ServerSGD:
    """x ← x + η Δ_t: FedAvg (η = 1) with a server learning rate; stateless.

    Parameters
    ----------
    learning_rate : float
        η, the step on the aggregate delta (> 0; 1.0 applies the mean delta as is).
    """

    def __init__(self, *, learning_rate: float = 1.0) -> None:
        _check_rate("learning_rate", learning_rate)
        self.learning_rate = learning_rate

    def step(self, weights: Arrays, delta: Arrays) -> Arrays:
        return [w + self.learning_rate * d for w, d in zip(_as64(weights), _as64(delta), strict=True)]

    def state(self) -> dict[str, NDArray[np.floating]]:
        return {}

    def load_state(self, state: dict[str, NDArray[np.floating]]) -> None:
        if state:
            raise ValueError("ServerSGD has no state to load")

    def __repr__(self) -> str:
        return f"ServerSGD(learning_rate={self.learning_rate})"


class ServerMomentum(_Stateful):
    """Server momentum (FedAvgM): v_t = β v_{t-1} + Δ_t; x ← x + η v_t (v_0 = 0).

    Flower's FedAvgM in the ascent convention: its pseudo-gradient is −Δ_t.

    Parameters
    ----------
    learning_rate : float
        η, the server learning rate (> 0).
    momentum : float
        β in [0, 1); 0 is `ServerSGD`.
    """

    _slots = ("v",)

    def __init__(self, *, learning_rate: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        _check_rate("learning_rate", learning_rate)
        _check_rate("momentum", momentum, high=1.0)
        self.learning_rate, self.momentum = learning_rate, momentum

    def step(self, weights: Arrays, delta: Arrays) -> Arrays:
        d = _as64(delta)
        v = [self.momentum * v + x for v, x in zip(self._moment("v", d), d, strict=True)]
        self.moments, self.steps = {"v": v}, self.steps + 1
        return [w + self.learning_rate * x for w, x in zip(_as64(weights), v, strict=True)]

    def __repr__(self) -> str:
        return f"ServerMomentum(learning_rate={self.learning_rate}, momentum={self.momentum})"


class _Adaptive(_Stateful):
    """The adaptive family of Reddi et al. (Algorithm 2); subclasses say how v is updated.

    Parameters
    ----------
    learning_rate : float
        η, the server learning rate (> 0).
    beta1 : float
        β1 in [0, 1), the decay of the first moment m (0: no momentum).
    beta2 : float
        β2 in [0, 1), the decay of the second moment v (Adam, Yogi; Adagrad has none).
    tau : float
        τ > 0, added to √v: it bounds the step where v is small (the degree of adaptivity).
    initial_v : float
        v before the first round (>= 0): 0 as in Flower, or τ² as the paper suggests.
    """

    _slots = ("m", "v")

    def __init__(self, *, learning_rate: float, beta1: float, beta2: float, tau: float,
                 initial_v: float = 0.0) -> None:
        super().__init__()
        _check_rate("learning_rate", learning_rate)
        _check_rate("beta1", beta1, high=1.0)
        _check_rate("beta2", beta2, high=1.0)
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be > 0, got {tau}")
        _check_rate("initial_v", initial_v)
        self.learning_rate, self.beta1, self.beta2, self.tau, self.initial_v = learning_rate, beta1, beta2, tau, initial_v

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError

    def step(self, weights: Arrays, delta: Arrays) -> Arrays:
        d = _as64(delta)
        m = [self.beta1 * m + (1 - self.beta1) * x for m, x in zip(self._moment("m", d), d, strict=True)]
        v = [self._second_moment(v, x * x) for v, x in zip(self._moment("v", d, self.initial_v), d, strict=True)]
        self.moments, self.steps = {"m": m, "v": v}, self.steps + 1
        return [w + self.learning_rate * a / (np.sqrt(b) + self.tau) for w, a, b in zip(_as64(weights), m, v, strict=True)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(learning_rate={self.learning_rate}, beta1={self.beta1}, "
                f"beta2={self.beta2}, tau={self.tau})")


class ServerAdagrad(_Adaptive):
    """FedAdagrad: v_t = v_{t-1} + Δ_t² (β2 is not used). Flower's defaults: η 0.1, β1 0, τ 1e-9."""

    def __init__(self, *, learning_rate: float = 0.1, beta1: float = 0.0, tau: float = 1e-9,
                 initial_v: float = 0.0) -> None:
        super().__init__(learning_rate=learning_rate, beta1=beta1, beta2=0.0, tau=tau, initial_v=initial_v)

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        return v + d2

    def __repr__(self) -> str:
        return f"ServerAdagrad(learning_rate={self.learning_rate}, beta1={self.beta1}, tau={self.tau})"


class ServerAdam(_Adaptive):
    """FedAdam: v_t = β2 v_{t-1} + (1-β2) Δ_t². Flower's defaults: η 0.1, β1 0.9, β2 0.99, τ 1e-9."""

    def __init__(self, *, learning_rate: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9,
                 initial_v: float = 0.0) -> None:
        super().__init__(learning_rate=learning_rate, beta1=beta1, beta2=beta2, tau=tau, initial_v=initial_v)

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        return self.beta2 * v + (1 - self.beta2) * d2


class ServerYogi(_Adaptive):
    """FedYogi: v_t = v_{t-1} − (1-β2) Δ_t² sign(v_{t-1} − Δ_t²). Flower's defaults: η 0.01, β1 0.9,
    β2 0.99, τ 1e-3."""

    def __init__(self, *, learning_rate: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 initial_v: float = 0.0) -> None:
        super().__init__(learning_rate=learning_rate, beta1=beta1, beta2=beta2, tau=tau, initial_v=initial_v)

    def _second_moment(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
