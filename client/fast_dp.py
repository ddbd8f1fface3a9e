"""DP-SGD at torch speed for the study's model family: per-sample norms in closed form, clipping and
noise in a few batched array operations.

The study model (`fedcare.model.RiskMLP`) is a stack of `nn.Linear` layers with ReLU between them
(no hidden layer: logistic regression). For such a stack, one forward pass keeps each layer's input
a_l, and one manual backward pass gives each layer's per-sample output gradient g_l (rows: samples).
The per-sample gradient of layer l's weight is the outer product g_i a_iᵀ, whose Frobenius norm is
‖g_i‖·‖a_i‖ (the "ghost norm"), and its bias gradient is g_i; so

    ‖∇ℓ_i‖² = Σ_l ‖g_{l,i}‖² (‖a_{l,i}‖² + 1)

without materializing any per-sample gradient. With c_i = min(1, C / (‖∇ℓ_i‖ + 1e-6)) (Opacus'
clipping coefficient), the clipped sum is one matmul per layer, (c ⊙ G_l)ᵀ A_l, and its bias the
column sum of c ⊙ G_l. Then, as Opacus' DPOptimizer with `loss_reduction="mean"`: Gaussian noise
of std σ·C (from the site's cryptographic source, `privacy.noise.CryptoGaussian`, hardened) is
added to each summed gradient (one draw for all of them, the very values Opacus' one draw per
parameter takes from the same key), which is divided by the expected batch size q·n, and the
study's torch optimizer steps. The Python work per step is a fixed handful of numpy calls per
layer, on views of the weights (a torch operator on matrices this small costs 2-10 µs of dispatch,
a numpy call ~1 µs).

Opacus remains the reference and the accountant: `tests/test_fast_dp.py` checks the update equals
Opacus' ghost-clipping update on the same batch and the same key's noise (to 1e-6) for every supported shape, and
the privacy ledger charges from the same `DPSchedule` either way. `supports(model)` says whether a
model is inside this fast path; `client.training.train_round` falls back to Opacus otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from privacy.noise import CryptoGaussian

CLIP_EPSILON = 1e-6  # Opacus' get_clipping_coef: C / (norm + 1e-6)
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The model's Linear layers, if it is a Linear/ReLU stack ending in a Linear with one output;
    None if it is anything else (which then trains through Opacus)."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential) or len(net) == 0:
        return None
    layers: list[nn.Linear] = []
    expect_linear = True
    for module in net:
        if expect_linear and type(module) is nn.Linear and module.bias is not None:
            layers.append(module)
        elif not expect_linear and type(module) is nn.ReLU:
            pass
        else:
            return None
        expect_linear = not expect_linear
    if expect_linear or layers[-1].out_features != 1:
        return None  # must end in a Linear layer with one output (the logit)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable != {id(p) for layer in layers for p in (layer.weight, layer.bias)}:
        return None
    return layers


def supports(model: nn.Module) -> bool:
    """True if `FastDPSGD` trains this model (else Opacus does)."""
    return linear_layers(model) is not None


class FastDPSGD:
    """One DP-SGD step at a time on a Linear/ReLU stack, with the loss BCE-with-logits (mean).

    Parameters
    ----------
    model : nn.Module
        The study model; `supports(model)` must hold. Updated in place by `step`.
    optimizer : torch.optim.Optimizer
        The study's local optimizer over the model's parameters; it steps on the privatized gradient.
    noise_multiplier : float
        σ of the study's DP schedule.
    max_grad_norm : float
        The clipping norm C.
    expected_batch_size : float
        q·n, by which the noised sum is divided (Opacus' `expected_batch_size`).
    noise : CryptoGaussian
        Where the Gaussian noise comes from.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, noise: CryptoGaussian) -> None:
        layers = linear_layers(model)
        if layers is None:
            raise TypeError(f"{type(model).__name__}: not a Linear/ReLU stack; train it with Opacus")
        self.layers = layers
        self.params = [p for layer in layers for p in (layer.weight, layer.bias)]
        self.sizes = [p.numel() for p in self.params]
        self.total = sum(self.sizes)
        bounds = np.cumsum([0, *self.sizes])
        self.slots = [(slice(bounds[2 * i], bounds[2 * i + 1]), slice(bounds[2 * i + 1], bounds[2 * i + 2]))
                      for i in range(len(layers))]  # (weight, bias) of each layer in the flat gradient
        self.optimizer = optimizer
        self.std = float(noise_multiplier) * float(max_grad_norm)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.noise = noise

    def privatized_gradients(self, xb: torch.Tensor | np.ndarray, yb: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """[weight, bias] gradients of every layer, clipped per sample, summed, noised and averaged.

        Computed in numpy on views of the weights (no copy): for matrices of a few thousand values,
        a numpy call costs ~1 µs where a torch operator costs 2-10 µs, and a step is ~40 calls."""
        weights = [layer.weight.detach().numpy() for layer in self.layers]
        biases = [layer.bias.detach().numpy() for layer in self.layers]
        a, y = (v.numpy() if isinstance(v, torch.Tensor) else v for v in (xb, yb))
        inputs: list[np.ndarray] = []
        active: list[np.ndarray] = []  # ReLU masks of the hidden layers
        last = len(weights) - 1
        for i, (w, b) in enumerate(zip(weights, biases)):
            inputs.append(a)
            z = a @ w.T
            z += b
            if i < last:
                mask = z > 0
                active.append(mask)
                a = z * mask
        # d ℓ_i / d logit_i = sigmoid(z) - y, per sample: [B, 1]; sigmoid as tanh, which cannot overflow
        g = np.tanh(z * 0.5)
        g += 1.0
        g *= 0.5
        g -= y[:, None]
        grads: list[np.ndarray] = [g] * len(weights)
        norm2 = np.zeros(len(y), dtype=z.dtype)
        for i in range(last, -1, -1):
            grads[i] = g
            norm2 += np.einsum("ij,ij->i", g, g) * (np.einsum("ij,ij->i", inputs[i], inputs[i]) + 1.0)
            if i > 0:
                g = (g @ weights[i]) * active[i - 1]
        coefficient = self.max_grad_norm / (np.sqrt(norm2) + CLIP_EPSILON)
        np.minimum(coefficient, 1.0, out=coefficient)
        flat = np.empty(self.total, dtype=z.dtype)
        for (w_slot, b_slot), a_in, g_out in zip(self.slots, inputs, grads):
            clipped = g_out * coefficient[:, None]
            np.matmul(clipped.T, a_in, out=flat[w_slot].reshape(clipped.shape[1], a_in.shape[1]))
            clipped.sum(axis=0, out=flat[b_slot])
        # one draw for every parameter, in parameter order (the same values Opacus draws one
        # parameter at a time from the same stream would take, concatenated)
        flat += self.noise.hardened(self.total, self.std, dtype=_TORCH_DTYPES[flat.dtype]).numpy()
        flat /= self.expected_batch_size
        out = torch.from_numpy(flat)
        return [piece.view_as(p) for piece, p in zip(out.split(self.sizes), self.params)]

    def step(self, xb: torch.Tensor | np.ndarray, yb: torch.Tensor | np.ndarray, *, extra=None) -> None:
        """One DP-SGD step on the batch, tensors or arrays (`extra(param, grad)` may add a data-free
        term, e.g. FedProx's)."""
        for p, grad in zip(self.params, self.privatized_gradients(xb, yb), strict=True):
            p.grad = grad
            if extra is not None:
                extra(p, grad)
        self.optimizer.step()
