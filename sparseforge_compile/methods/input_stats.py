"""Running statistics of the inputs one linear layer sees over calibration tokens: the Gram matrix
``H = 2 X X^T`` that SparseGPT uses as the Hessian of the layer-wise squared error, and the
per-feature input norms ``||X_j||_2`` that Wanda weighs |W| by."""

from __future__ import annotations

import torch


class LayerInputStats:
    """Accumulates one layer's calibration inputs, batch by batch, in fp32.

    Both statistics are running averages over calibration *sequences*, updated exactly as the
    SparseGPT and Wanda reference implementations do (``H *= n / (n + b); n += b; H += 2/n X X^T``),
    so a rescaled copy of theirs; the scale cancels in both algorithms (damping is relative to the
    mean diagonal, Wanda compares within a row). ``feature_norms()`` undoes the scale.

    Inputs are ``(batch, seq, in_features)`` (a batch of ``batch`` sequences) or
    ``(tokens, in_features)`` (counted as one sequence, as the references do; OPT flattens its MLP
    inputs). Unrolled, the update is ``H = 2/n * sum over all tokens of x x^T`` whatever the batch
    sizes, so every token weighs the same; only the overall scale depends on the counting.
    """

    def __init__(self, in_features: int, *, gram: bool = True, norms: bool = True,
                 device: torch.device | str | None = None, layer: str = "layer") -> None:
        if not (gram or norms):
            raise ValueError(f"{layer}: LayerInputStats needs at least one of gram=True or norms=True")
        self.in_features = int(in_features)
        self.layer = layer
        self.device = torch.device(device) if device is not None else None
        self.nsamples = 0  # calibration sequences seen
        self.ntokens = 0
        self._want_gram = gram
        self._want_norms = norms
        self._gram: torch.Tensor | None = None
        self._sq_norms: torch.Tensor | None = None  # running mean over sequences of sum_t x_tj^2

    def _allocate(self, device: torch.device) -> None:
        dev = self.device or device
        if self._want_gram:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=dev)
        if self._want_norms:
            self._sq_norms = torch.zeros(self.in_features, dtype=torch.float32, device=dev)

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer}: input of shape {tuple(inputs.shape)} has {inputs.shape[-1]} features, "
                f"the layer takes {self.in_features}"
            )
        batch = inputs.shape[0] if inputs.dim() == 3 else 1
        x = inputs.reshape(-1, self.in_features)
        if self._gram is None and self._sq_norms is None:
            self._allocate(x.device)
        target = self._gram.device if self._gram is not None else self._sq_norms.device
        x = x.to(device=target, dtype=torch.float32)
        keep = self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.ntokens += x.shape[0]
        if self._gram is not None:
            # One fused kernel for H <- keep * H + (2 / n) X^T X.
            self._gram.addmm_(x.t(), x, beta=keep, alpha=2.0 / self.nsamples)
        if self._sq_norms is not None:
            self._sq_norms.mul_(keep).add_(x.square().sum(dim=0), alpha=1.0 / self.nsamples)

    def _require(self, what: str, value: torch.Tensor | None) -> torch.Tensor:
        if self.nsamples == 0:
            raise RuntimeError(
                f"{self.layer}: no calibration inputs reached this layer, so it has no {what}; check that "
                f"the layer is used in the forward pass"
            )
        if value is None:
            raise RuntimeError(f"{self.layer}: {what} was not requested when the statistics were created, or was "
                               f"already handed over (take_hessian) or freed")
        return value

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n * sum X X^T`` over the calibration tokens, ``(in, in)`` fp32 (n = sequences)."""
        return self._require("Hessian", self._gram)

    def feature_norms(self) -> torch.Tensor:
        """``||X_j||_2`` of every input feature j over all calibration tokens, fp32 ``(in,)``."""
        return (self._require("input norms", self._sq_norms) * self.nsamples).sqrt()

    def take_hessian(self) -> torch.Tensor:
        """Hand the Hessian over (the caller may modify it in place) and drop this object's reference."""
        h = self.hessian
        self._gram = None
        return h

    def free(self) -> None:
        self._gram = None
        self._sq_norms = None
