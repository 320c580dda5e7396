"""One-shot peer pruning methods: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar &
Alistarh 2023), each as its paper and reference implementation define it.

``prune_oneshot`` prunes a model's weights in place and returns the keep-masks in
``(out_features, in_features)`` layout (also for GPT-2's ``Conv1D``, whose weight is stored
``(in, out)``). N:M groups are M consecutive *input* features, as in :mod:`masks`.

Wanda and SparseGPT calibrate sequentially, block by block, as the references do: the inputs of
the first decoder block are captured once, then every block collects its layers' input
statistics, is pruned, and is run again so that the next block sees the outputs of the pruned
model so far. Only one block's statistics exist at a time, and a block can be moved to the
compute device on its own while the rest of the model stays on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import PruneError
from .hessian import LayerInputStats
from .layers import find_decoder_blocks, prunable_modules, weight_out_in
from .masks import NMPattern

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")
# With percdamp 0 a failing Cholesky has nothing to multiply by 10; retries start here instead.
MIN_RETRY_PERCDAMP = 1e-4
DEFAULT_PATTERN = NMPattern(2, 4)




# ------------------------------------------------------------------------------------ config

@dataclass
class OneShotConfig:
    """Knobs of the one-shot methods; the defaults are the papers'."""

    percdamp: float = 0.01  # SparseGPT: damping = percdamp * mean(diag(H))
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    batch_size: int = 8  # calibration sequences per catcher / block forward
    device: str | torch.device | None = None  # compute device; None: where the model's parameters are
    max_damp_retries: int = 6  # SparseGPT: Cholesky retries, percdamp x damp_growth each
    damp_growth: float = 10.0
    measure_error: bool = True  # relative reconstruction error per layer (needs X^T X for Wanda too)

    def __post_init__(self) -> None:
        if not (isinstance(self.percdamp, (int, float)) and self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise ValueError(f"percdamp {self.percdamp!r} must be a finite number >= 0 (the paper uses 0.01)")
        for name in ("blocksize", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer")
        if not isinstance(self.max_damp_retries, int) or self.max_damp_retries < 0:
            raise ValueError(f"max_damp_retries {self.max_damp_retries!r} must be an integer >= 0")
        if not self.damp_growth > 1:
            raise ValueError(f"damp_growth {self.damp_growth!r} must be > 1 so that each retry damps more")


# ------------------------------------------------------------------------------------ results

@dataclass
class LayerPruneStats:
    name: str
    out_features: int
    in_features: int
    sparsity: float  # achieved: fraction of mask entries pruned
    seconds: float
    reconstruction_error: float | None = None  # ||W X - W' X||_F^2 / ||W X||_F^2 over the calibration tokens
    damping: float | None = None  # SparseGPT: absolute value added to diag(H)
    percdamp: float | None = None  # SparseGPT: damping relative to mean(diag(H)) actually used
    damping_retries: int = 0  # SparseGPT: Cholesky failures before damping was enough
    dead_inputs: int = 0  # SparseGPT: input features that were zero on every calibration token
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    pruned_with: str = ""  # SparseGPT: the layers (comma-separated) with its input, pruned as one stacked weight


@dataclass
class OneShotResult:
    method: str
    pattern: str | None  # "2:4", or None for unstructured
    target_sparsity: float
    masks: dict[str, torch.Tensor]  # layer name -> bool keep-mask, (out_features, in_features)
    layers: dict[str, LayerPruneStats]
    seconds: float
    device: str
    peak_memory_bytes: int | None  # CUDA: max allocated during the call; CPU: process peak RSS
    peak_memory_kind: str  # "cuda_max_allocated" or "process_peak_rss"
    calibration_shape: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights over all pruned layers."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_rows(self) -> list[dict]:
        """Flat per-layer rows for a results file."""
        return [{"method": self.method, "pattern": self.pattern, **asdict(s)} for s in self.layers.values()]

    def summary(self) -> dict:
        errors = [s.reconstruction_error for s in self.layers.values() if s.reconstruction_error is not None]
        return {"method": self.method, "pattern": self.pattern, "target_sparsity": self.target_sparsity,
                "sparsity": self.sparsity, "layers": len(self.layers), "seconds": self.seconds,
                "device": self.device, "peak_memory_bytes": self.peak_memory_bytes,
                "peak_memory_kind": self.peak_memory_kind,
                "mean_reconstruction_error": sum(errors) / len(errors) if errors else None,
                "damping_retries": sum(s.damping_retries for s in self.layers.values())}


# ------------------------------------------------------------------------------ mask selection

def _prune_smallest(scores: torch.Tensor, count: int, per_row: bool = False) -> torch.Tensor:
    """Bool mask (True = prune) of exactly ``count`` smallest scores, of the whole tensor or of each row.

    A stable sort makes ties go to the lower index; NaN scores are pruned first.
    """
    scores = torch.nan_to_num(scores.float(), nan=-torch.inf)
    prune = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count <= 0:
        return prune
    if per_row:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        return prune.scatter_(1, order, True)
    order = torch.sort(scores.flatten(), stable=True).indices[:count]
    return prune.view(-1).index_fill_(0, order, True).view(scores.shape)


def nm_prune_smallest(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Bool mask (True = prune) of the M-N smallest scores of every M consecutive inputs.

    Among equal scores the lower index is pruned first: the set that the references'
    ``torch.topk(scores, M - N, largest=False)`` selects on CUDA (radix select, ties taken in index
    order). Ties are common in quantized checkpoints (15% of SmolLM2 Q4_1's 2:4 groups tie at the
    cut on |W|), where this rule changes magnitude 2:4 WikiText-2 perplexity by almost 2x.
    """
    pattern.check_divides(int(scores.shape[-1]), "scores")
    groups = torch.nan_to_num(scores.detach().float(), nan=-torch.inf).reshape(-1, pattern.m)
    order = torch.sort(groups, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
    prune = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    return prune.scatter_(1, order, True).reshape(scores.shape)


def _count_for(sparsity: float, total: int) -> int:
    return int(math.floor(sparsity * total + 0.5))


def magnitude_keep_mask(weight: torch.Tensor, pattern: NMPattern | None,
                        sparsity: float | None = None) -> torch.Tensor:
    """Keep-mask by |W| of an ``(out, in)`` weight: N:M per group, else the smallest ``sparsity`` of the layer."""
    scores = weight.detach().abs()
    if pattern is not None:
        return ~nm_prune_smallest(scores, pattern)
    return ~_prune_smallest(scores, _count_for(_check_ratio(sparsity), scores.numel()))


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and the input-feature norms ``(in,)``."""
    return weight.detach().abs().float() * feature_norms.to(weight.device, torch.float32).reshape(1, -1)


def wanda_keep_mask(weight: torch.Tensor, feature_norms: torch.Tensor, pattern: NMPattern | None,
                    sparsity: float | None = None) -> torch.Tensor:
    """Wanda's keep-mask: N:M per group, else the smallest ``sparsity`` of each output row."""
    scores = wanda_scores(weight, feature_norms)
    if pattern is not None:
        return ~nm_prune_smallest(scores, pattern)
    return ~_prune_smallest(scores, _count_for(_check_ratio(sparsity), scores.shape[1]), per_row=True)


def _check_ratio(sparsity: float | None) -> float:
    if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"unstructured sparsity {sparsity!r} must be a ratio in [0, 1), e.g. 0.5")
    return float(sparsity)


# ----------------------------------------------------------------------------------- SparseGPT

@dataclass
class SparseGPTLayerResult:
    weight: torch.Tensor  # (out, in) fp32, pruned entries zero, kept entries updated
    keep: torch.Tensor  # bool (out, in)
    damping: float
    percdamp: float
    damping_retries: int
    dead_inputs: int
    loss: float  # the algorithm's own OBS error estimate, sum over rows of sum (w - q)^2 / d^2 / 2


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float, max_retries: int, growth: float,
                               layer: str, shape: tuple[int, int]) -> tuple[torch.Tensor, float, float, int]:
    """Upper Cholesky factor of (H + damp I)^-1, damping more after each failed factorization.

    Adds the damping to ``hessian``'s diagonal in place. Returns (factor, damp, percdamp, retries).
    """
    mean_diag = float(hessian.diagonal().mean())
    relative, applied, retries = percdamp, 0.0, 0
    while True:
        damp = relative * mean_diag
        hessian.diagonal().add_(damp - applied)
        applied = damp
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper.diagonal()).all()):
                return upper, damp, relative, retries
        if retries >= max_retries:
            raise PruneError(
                f"{layer}: the {shape[1]}x{shape[1]} Hessian of this {shape[0]}x{shape[1]} layer is not positive "
                f"definite even with percdamp {relative:g} after {retries} retries; use more calibration data, "
                f"raise percdamp, or exclude the layer"
            )
        retries += 1
        next_relative = max(relative * growth, MIN_RETRY_PERCDAMP)
        log.warning("%s: Cholesky of the %dx%d Hessian failed with percdamp %g (damping %.4g); retrying with "
                    "percdamp %g", layer, shape[1], shape[1], relative, damp, next_relative)
        relative = next_relative


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, *, pattern: NMPattern | None,
                           sparsity: float | None = None, blocksize: int = 128, percdamp: float = 0.01,
                           max_damp_retries: int = 6, damp_growth: float = 10.0,
                           layer: str = "layer") -> SparseGPTLayerResult:
    """SparseGPT's ``fasterprune`` on one ``(out, in)`` weight with its Hessian ``2 X X^T`` ``(in, in)``.

    ``hessian`` is consumed: it is modified in place (dead columns, damping). The weight is not
    touched; the pruned and updated weight comes back in fp32 on the Hessian's device.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise PruneError(f"{layer}: Hessian of shape {tuple(hessian.shape)} does not match the {rows}x{cols} weight")
    if not bool(torch.isfinite(hessian).all()):
        raise PruneError(
            f"{layer}: the Hessian of this {rows}x{cols} layer holds NaN/inf, so its calibration inputs overflowed; "
            f"run the calibration in fp32 or exclude the layer"
        )
    if pattern is not None:
        pattern.check_divides(cols, layer)
        if blocksize % pattern.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for pattern {pattern}")
    else:
        sparsity = _check_ratio(sparsity)
    W = weight.detach().to(device=hessian.device, dtype=torch.float32, copy=True)
    H = hessian if hessian.dtype == torch.float32 else hessian.float()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    hinv, damp, relative, retries = _upper_cholesky_of_inverse(
        H, percdamp, max_damp_retries, damp_growth, layer, (rows, cols))
    del H

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d1 = Hinv1.diagonal()
        if pattern is None:
            # Unstructured: the block's share of the layer's exact prune count, by w^2 / d^2.
            count = _count_for(sparsity, rows * i2) - _count_for(sparsity, rows * i1)
            prune1 = _prune_smallest(W1.square() / d1.square(), count)
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                # Select on the weights as updated by the errors of the columns before them.
                scores = W1[:, i : i + pattern.m].square() / d1[i : i + pattern.m].square()
                prune1[:, i : i + pattern.m] = nm_prune_smallest(scores, pattern)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        loss += Err1.square().sum() / 2  # sum of (w - q)^2 / d^2 / 2
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1.0)  # the lazy batch update
        keep[:, i1:i2] = ~prune1
    return SparseGPTLayerResult(weight=W, keep=keep, damping=damp, percdamp=relative, damping_retries=retries,
                                dead_inputs=int(dead.sum()), loss=float(loss))


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||W X - W' X||_F^2 / ||W X||_F^2`` from the Gram matrix ``G ~ X X^T`` (any positive scale)."""
    dense = dense.detach().to(gram.device, torch.float32)
    delta = dense - pruned.detach().to(gram.device, torch.float32)
    num = float(((delta @ gram) * delta).sum())
    den = float(((dense @ gram) * dense).sum())
    return num / den if den > 0 else float("nan")


# --------------------------------------------------------------------- sequential calibration

class _StopForward(Exception):
    """Raised by the catcher on block 0 once its inputs are recorded."""


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _drop_caches(value: object) -> object:
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return value
    return None if isinstance(value, Cache) else value


@dataclass
class BlockInputs:
    """What the model passes to its first block for the calibration set, captured once.

    ``hidden``: ``(nsamples, seqlen, hidden)``. ``extras``: for each mini-batch size, the other
    positional and keyword arguments (attention mask, position ids / embeddings, cache disabled).
    Calibration windows are unpadded and of equal length, so these depend only on the batch size.
    """

    hidden: torch.Tensor
    extras: dict[int, tuple[tuple, dict]]
    batch_size: int

    def batches(self) -> Iterator[tuple[int, torch.Tensor, tuple, dict]]:
        for start in range(0, self.hidden.shape[0], self.batch_size):
            chunk = self.hidden[start : start + self.batch_size]
            args, kwargs = self.extras[chunk.shape[0]]
            yield start, chunk, args, kwargs


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside ``blocks`` to ``device``, and back afterwards.

    Parameters keep their identity (``.data`` is swapped), so tied weights stay tied.
    """
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    moved_params: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    moved_buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for param in module._parameters.values():
                if param is None or id(param) in inside or id(param) in moved_params or param.device == device:
                    continue
                moved_params[id(param)] = (param, param.data)
                param.data = param.data.to(device)
            for name, buf in module._buffers.items():
                if buf is None or id(buf) in inside or buf.device == device:
                    continue
                moved_buffers.append((module, name, buf))
                module._buffers[name] = buf.to(device)
        yield
    finally:
        for param, original in moved_params.values():
            param.data = original
        for module, name, buf in moved_buffers:
            module._buffers[name] = buf


@contextlib.contextmanager
def _block_on(block: nn.Module, device: torch.device) -> Iterator[None]:
    first = next(block.parameters(), None)
    home = first.device if first is not None else device
    if home != device:
        block.to(device)
    try:
        yield
    finally:
        if home != device:
            block.to(home)


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no KV cache, full-precision fp32 matmuls (as the references pin), restored after."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    precision = torch.get_float32_matmul_precision()
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, device: torch.device,
                         batch_size: int) -> BlockInputs:
    """Run the calibration windows up to block 0 (a catcher stops the forward there)."""
    recorded: dict[str, object] = {}

    def catcher(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(_drop_caches(a) for a in args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        recorded.update(hidden=hidden, rest=rest, kwargs=kwargs)
        raise _StopForward

    hidden_all: torch.Tensor | None = None
    extras: dict[int, tuple[tuple, dict]] = {}
    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        with _outside_blocks_on(model, blocks, device):
            for start in range(0, calib.shape[0], batch_size):
                batch = calib[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch)
                except _StopForward:
                    pass
                else:
                    raise PruneError(f"{type(model).__name__}: the forward pass never reached the first decoder block")
                hidden = recorded.pop("hidden")
                if hidden_all is None:
                    hidden_all = torch.empty((calib.shape[0], *hidden.shape[1:]), dtype=hidden.dtype, device=device)
                hidden_all[start : start + batch.shape[0]] = hidden
                extras.setdefault(batch.shape[0], (recorded.pop("rest"), recorded.pop("kwargs")))
                recorded.clear()
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden_all, extras=extras, batch_size=batch_size)


def _run_block(block: nn.Module, inputs: BlockInputs, out: torch.Tensor | None) -> None:
    for start, chunk, args, kwargs in inputs.batches():
        y = block(chunk, *args, **kwargs)
        if out is not None:
            out[start : start + chunk.shape[0]] = y[0] if isinstance(y, tuple) else y


# ----------------------------------------------------------------------------------- the API

def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _validate_calib(model: nn.Module, calib: torch.Tensor | None, method: str) -> torch.Tensor:
    if calib is None:
        raise ValueError(
            f"{method} needs calibration token windows: pass calib=data.calibration_windows(tokenizer, 128, 2048)"
        )
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype.is_floating_point or calib.numel() == 0:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise ValueError(f"calib must be a non-empty (nsamples, seqlen) tensor of token ids, got {shape}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(calib.min()), int(calib.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"calib holds token ids in [{low}, {high}] but the model's vocabulary has {vocab} entries: "
            f"tokenize the calibration text with this model's tokenizer"
        )
    config = getattr(model, "config", None)
    limit = next((v for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0), None)
    if limit is not None and calib.shape[1] > limit:
        raise ValueError(f"calibration windows of {calib.shape[1]} tokens exceed the model's {limit} positions: "
                         f"use a calibration seqlen <= {limit}")
    return calib.long()


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def prune_oneshot(model: nn.Module, method: str, *, pattern: NMPattern | str | None = DEFAULT_PATTERN,
                  sparsity: float | None = None, calib: torch.Tensor | None = None, layers: list[str] | None = None,
                  config: OneShotConfig | None = None, progress: bool = True) -> OneShotResult:
    """Prune ``model`` in place with ``method`` ("magnitude" | "wanda" | "sparsegpt").

    ``pattern``: N:M groups of consecutive input features; pass ``pattern=None`` and a ``sparsity``
    ratio for unstructured pruning (per layer for magnitude and SparseGPT, per output row for Wanda).
    ``calib``: ``(nsamples, seqlen)`` token ids, needed by Wanda and SparseGPT.
    ``layers``: qualified module names; default every Linear / Conv1D inside the decoder blocks.
    """
    config = config or OneShotConfig()
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    pattern = NMPattern.parse(pattern) if pattern is not None else None
    if pattern is not None and sparsity is not None:
        raise ValueError(f"give either pattern ({pattern}) or sparsity ({sparsity}): pass pattern=None for "
                         f"unstructured pruning at a ratio")
    if pattern is None:
        sparsity = _check_ratio(sparsity)
    if method == "sparsegpt" and pattern is not None and config.blocksize % pattern.m:
        raise ValueError(f"blocksize {config.blocksize} must be a multiple of M={pattern.m} for pattern {pattern}")
    device = torch.device(config.device) if config.device is not None else _model_device(model)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here: use device='cpu'")
    targets = prunable_modules(model, layers, pattern)
    calib = _validate_calib(model, calib, method) if method in CALIBRATED_METHODS else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with _calibration_mode(model):
        if method == "magnitude":
            stats, masks = _prune_magnitude(targets, pattern, sparsity, device, progress)
        else:
            stats, masks = _prune_sequential(model, method, targets, calib, pattern, sparsity, config, device,
                                             progress)
    seconds = time.perf_counter() - start
    peak, kind = _peak_memory(device)
    return OneShotResult(method=method, pattern=str(pattern) if pattern is not None else None,
                         target_sparsity=1.0 - pattern.density if pattern is not None else float(sparsity),
                         masks=masks, layers=stats, seconds=seconds, device=str(device), peak_memory_bytes=peak,
                         peak_memory_kind=kind,
                         calibration_shape=tuple(calib.shape) if calib is not None else None)


def _layer_stats(name: str, keep: torch.Tensor, seconds: float, **extra: object) -> LayerPruneStats:
    return LayerPruneStats(name=name, out_features=int(keep.shape[0]), in_features=int(keep.shape[1]),
                           sparsity=1.0 - float(keep.float().mean()), seconds=seconds, **extra)


@torch.no_grad()
def _prune_magnitude(targets: dict[str, nn.Module], pattern: NMPattern | None, sparsity: float | None,
                     device: torch.device, progress: bool) -> tuple[dict, dict]:
    stats: dict[str, LayerPruneStats] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, module in tqdm(targets.items(), desc="magnitude", disable=not progress, unit="layer"):
        t0 = time.perf_counter()
        weight = weight_out_in(module)
        keep = magnitude_keep_mask(weight.to(device), pattern, sparsity).to(weight.device)
        weight.mul_(keep)
        masks[name] = keep
        stats[name] = _layer_stats(name, keep, time.perf_counter() - t0)
    return stats, masks


def _group_by_block(targets: dict[str, nn.Module], blocks_name: str, count: int) -> tuple[dict[int, list[str]],
                                                                                           list[str]]:
    """Target layers by the index of the block that holds them, and those outside every block."""
    grouped: dict[int, list[str]] = {}
    outside: list[str] = []
    prefix = f"{blocks_name}."
    for name in targets:
        index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if index.isdigit() and int(index) < count:
            grouped.setdefault(int(index), []).append(name)
        else:
            outside.append(name)
    return grouped, outside


@contextlib.contextmanager
def _hooked_stats(layers: dict[str, nn.Module], method: str,
                  measure_error: bool) -> Iterator[dict[str, LayerInputStats]]:
    """Input statistics for ``layers``, filled by forward hooks while the ``with`` body runs data."""
    want_gram = method == "sparsegpt" or measure_error
    collected = {
        name: LayerInputStats(int(weight_out_in(module).shape[1]), gram=want_gram, norms=method == "wanda",
                              layer=name)
        for name, module in layers.items()
    }
    handles = [module.register_forward_hook(lambda _m, args, _out, s=collected[name]: s.add_batch(args[0]))
               for name, module in layers.items()]
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def _check_whole_model_on(model: nn.Module, layers: list[str], device: torch.device) -> None:
    def same(a: torch.device) -> bool:  # "cuda" names the current device, "cuda:0" one of them
        return a.type == device.type and (a.index is None or device.index is None or a.index == device.index)

    elsewhere = sorted({str(t.device) for t in model.parameters() if not same(t.device)})
    if elsewhere:
        raise PruneError(f"layers {', '.join(layers)} run after the decoder blocks; calibrating them runs the whole "
                         f"model on {device}, but parts of it are on {', '.join(elsewhere)}: load the model on "
                         f"{device}, or exclude those layers (--exclude) or prune them with magnitude")


@torch.no_grad()
def _whole_model_stats(model: nn.Module, layers: dict[str, nn.Module], calib: torch.Tensor, device: torch.device,
                       batch_size: int, method: str, measure_error: bool) -> dict[str, LayerInputStats]:
    """Statistics of layers after the decoder blocks (a BERT MLM-head transform, OPT's project_out), from
    whole-model forwards of the calibration set through the blocks as pruned so far."""
    with _hooked_stats(layers, method, measure_error) as collected:
        for start in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[start : start + batch_size].to(device))
    return collected


@torch.no_grad()
def _prune_sequential(model: nn.Module, method: str, targets: dict[str, nn.Module], calib: torch.Tensor,
                      pattern: NMPattern | None, sparsity: float | None, config: OneShotConfig,
                      device: torch.device, progress: bool) -> tuple[dict, dict]:
    blocks_name, blocks = find_decoder_blocks(model)
    per_block, outside = _group_by_block(targets, blocks_name, len(blocks))
    last = max(per_block, default=-1)
    stats: dict[str, LayerPruneStats] = {}
    masks: dict[str, torch.Tensor] = {}

    def prune(names: list[str], collected: dict[str, LayerInputStats]) -> None:
        groups = _shared_input_groups(names, collected) if method == "sparsegpt" else [[n] for n in names]
        for group in groups:
            results = _prune_group(method, {n: targets[n] for n in group}, {n: collected.pop(n) for n in group},
                                   pattern, sparsity, config)
            for name, (keep, layer_stats) in results.items():
                layer_stats.calibration_sequences = int(calib.shape[0])
                masks[name], stats[name] = keep, layer_stats

    def masks_home(names: list[str]) -> None:  # next to their weights, once a block is back on its device
        for name in names:
            masks[name] = masks[name].to(weight_out_in(targets[name]).device)

    # Layers outside the blocks that run before block 0 (an input projection) see the calibration data
    # on the way to it: pruned first, so that the blocks calibrate on their pruned outputs.
    with _hooked_stats({n: targets[n] for n in outside}, method, config.measure_error) as collected:
        inputs = capture_block_inputs(model, blocks, calib, device, config.batch_size)
    before = [n for n in outside if collected[n].ntokens]
    after = [n for n in outside if not collected[n].ntokens]
    if after:
        _check_whole_model_on(model, after, device)  # before any weight changes
    try:
        if before:
            prune(before, collected)
            masks_home(before)
            del inputs
            inputs = capture_block_inputs(model, blocks, calib, device, config.batch_size)
        del collected
        spare = torch.empty_like(inputs.hidden)
        bar = tqdm(range(last + 1), desc=f"{method} {pattern or sparsity}", disable=not progress, unit="block")
        for index in bar:
            block = blocks[index]
            with _block_on(block, device):
                names = per_block.get(index, [])
                if names:
                    prune(names, _collect_block_stats(block, inputs, {n: targets[n] for n in names}, method,
                                                      config.measure_error))
                if index < last:
                    # The next block's inputs come from this block as pruned.
                    _run_block(block, inputs, spare)
                    inputs.hidden, spare = spare, inputs.hidden
            masks_home(names)
        del inputs, spare
        if after:  # layers after the blocks: one pass of the whole model, blocks pruned
            prune(after, _whole_model_stats(model, {n: targets[n] for n in after}, calib, device, config.batch_size,
                                            method, config.measure_error))
            masks_home(after)
    except PruneError as exc:
        done = list(stats)  # in pruning order
        if done:
            raise PruneError(f"{exc} (the model is already pruned in {len(done)} layers up to {done[-1]}: "
                             f"reload it before retrying)") from exc
        raise
    return stats, masks


def _collect_block_stats(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], method: str,
                         measure_error: bool) -> dict[str, LayerInputStats]:
    with _hooked_stats(layers, method, measure_error) as collected:
        _run_block(block, inputs, None)
    return collected


def _shared_input_groups(names: list[str], collected: dict[str, LayerInputStats]) -> list[list[str]]:
    """``names`` grouped by identical Hessians, in order of first appearance: layers that read the same
    input (q/k/v, gate/up) get bitwise-equal ones, since the same tokens were accumulated the same way,
    and SparseGPT then prunes them as one stacked weight (its rows are independent given H^-1): one
    Cholesky and one column loop instead of three."""
    groups: list[list[str]] = []
    for name in names:
        stats = collected[name]
        for group in groups:
            first = collected[group[0]]
            if (first.in_features == stats.in_features and first.ntokens == stats.ntokens
                    and first.nsamples == stats.nsamples and torch.equal(first.hessian, stats.hessian)):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def _prune_group(method: str, modules: dict[str, nn.Module], collected: dict[str, LayerInputStats],
                 pattern: NMPattern | None, sparsity: float | None,
                 config: OneShotConfig) -> dict[str, tuple[torch.Tensor, LayerPruneStats]]:
    """Wanda on one layer, or SparseGPT on layers with one shared Hessian (one layer, or several that
    read the same input), their weights stacked row-wise: each row's result is what pruning its own
    layer alone gives (up to the summation order of the lazy batch updates)."""
    t0 = time.perf_counter()
    names = list(modules)
    weights = [weight_out_in(modules[n]) for n in names]
    label = " + ".join(names)
    dense = [w.float().clone() for w in weights] if config.measure_error else None
    extra: dict[str, object] = {}
    if method == "wanda":
        (weight,) = weights
        keeps = [wanda_keep_mask(weight, collected[names[0]].feature_norms(), pattern, sparsity)]
        weight.mul_(keeps[0])
        gram = collected[names[0]].hessian if config.measure_error else None
    else:
        if len({(w.dtype, w.device) for w in weights}) > 1:
            raise PruneError(f"{label}: these layers share their input but not dtype/device "
                             f"({', '.join(f'{w.dtype} on {w.device}' for w in weights)}); put the block on one dtype")
        hessian = collected[names[0]].take_hessian()
        gram = hessian.clone() if config.measure_error else None
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        result = sparsegpt_prune_weight(stacked, hessian, pattern=pattern, sparsity=sparsity,
                                        blocksize=config.blocksize, percdamp=config.percdamp,
                                        max_damp_retries=config.max_damp_retries, damp_growth=config.damp_growth,
                                        layer=label)
        del hessian
        keeps, row = [], 0
        for weight in weights:
            rows = slice(row, row + weight.shape[0])
            row += weight.shape[0]
            weight.copy_(result.weight[rows])
            keeps.append(result.keep[rows].clone())  # its own storage: a saved view would save the group's
        extra.update(damping=result.damping, percdamp=result.percdamp, damping_retries=result.damping_retries,
                     dead_inputs=result.dead_inputs)
    seconds, total_rows = time.perf_counter() - t0, sum(w.shape[0] for w in weights)
    out = {}
    for i, (name, weight, keep) in enumerate(zip(names, weights, keeps)):
        layer_extra = {**extra, "calibration_tokens": collected[name].ntokens,
                       "pruned_with": ",".join(n for n in names if n != name)}
        if gram is not None:
            layer_extra["reconstruction_error"] = reconstruction_error(dense[i], weight, gram)
        collected[name].free()
        # A group's time, shared out by rows.
        out[name] = (keep, _layer_stats(name, keep, seconds * weight.shape[0] / total_rows, **layer_extra))
    return out
