"""2:4 Linear layers on sparse tensor cores: the ``sparseforge::sparse_linear`` custom op, the
compressed-weight module :class:`SparseLinear`, the per-shape algorithm cache and the measured
dense-versus-sparse dispatch.

The kernel is cuSPARSELt through ``torch._cslt_sparse_mm``, whose *first* operand is the structured
one, so a Linear ``y = x W^T`` runs as ``y^T = W (x^T)`` with ``transpose_result=True`` (the kernel
writes ``y`` directly) and the bias fused into the epilogue. The input is flattened to 2-D and its
token count padded to a multiple of :data:`TOKEN_MULTIPLE` (cuSPARSELt rejects a single token).

Which kernel runs is decided per token-count bucket (powers of two) on the Python side, from the
static token count of the call, so a CUDA graph records one fixed kernel and nothing syncs. The
choice (cuSPARSELt algorithm id, split-k, or cuBLAS dense) is measured once per (device, weight
shape, bucket, dtype) with CUDA-graph replays and kept in memory and in a JSON file under
``$SPARSEFORGE_CACHE`` (default ``~/.cache/sparseforge``), so another process reuses it.

On the CPU (and for dtypes or shapes the kernel does not take) the op is a dense matmul with the
masked weight, identical to the hardened model, which is how CI exercises the whole path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cuda_graphs import capture, warm_up
from .errors import NMViolationError
from .masks import NMPattern, count_nm_violations

log = logging.getLogger(__name__)

TOKEN_MULTIPLE = 16  # cuSPARSELt bf16/fp16 dense-operand multiple (8), rounded up: 1 token fails
WEIGHT_MULTIPLE = 16  # both dims of the compressed operand
SPARSE_DTYPES = (torch.bfloat16, torch.float16)
CACHE_FILE = "kernel_plans.json"




def nm_violation_error(layer: str, weight: Tensor, pattern: NMPattern, violations: int) -> NMViolationError:
    groups = weight.numel() // pattern.m
    return NMViolationError(
        f"{layer}: weight {tuple(weight.shape)} is not {pattern}: {violations} of {groups} groups of "
        f"{pattern.m} inputs hold more than {pattern.n} nonzeros. Harden the layer to {pattern} first "
        f"(prune and fix its mask) or leave it out of the layers to lower"
    )


def check_nm(weight: Tensor, pattern: NMPattern, layer: str) -> None:
    """Raise :class:`NMViolationError` naming the layer and the count unless ``weight`` is N:M."""
    pattern.check_divides(int(weight.shape[-1]), layer)
    violations = count_nm_violations(weight, pattern)
    if violations:
        raise nm_violation_error(layer, weight, pattern, violations)


def is_exact_nm(weight: Tensor, pattern: NMPattern) -> bool:
    """True for a hardened weight: no group breaks the pattern and about N/M of it is nonzero.

    The lower density bound keeps nearly empty weights (zero-initialised adapters) out.
    """
    if weight.dim() != 2 or weight.shape[-1] % pattern.m or weight.numel() == 0:
        return False
    if count_nm_violations(weight, pattern):
        return False
    density = float((weight.detach() != 0).sum()) / weight.numel()
    return 0.5 * pattern.density <= density <= pattern.density


# ---------------------------------------------------------------------------------------------
# Dispatch configuration and token buckets
# ---------------------------------------------------------------------------------------------

MAX_ALGS = 32  # cuSPARSELt algorithm ids timed per large bucket
SPARSE_MIN_GAIN = 0.04  # the sparse kernel must be this much faster than dense to be dispatched
# ...and this much below SMALL_BUCKET tokens, the dense/sparse crossover on the H200, where calls are
# short and the choice's own timing and kernels.py's disagreed twice (22016x4096 at 256 tokens: chosen
# sparse, then timed at 0.95x): the few % a true sparse win there brings is worth less than the risk.
SPARSE_MIN_GAIN_SMALL = 0.10
SMALL_BUCKET = 1024
CACHE_VERSION = 5  # bump when the dispatch rule changes, so cached decisions are re-measured


@dataclass(frozen=True)
class DispatchConfig:
    """How lowered layers choose between the sparse kernel and dense cuBLAS.

    ``min_bucket``..``max_bucket`` (powers of two) are the token-count buckets measured at lowering
    time; a call with more tokens than ``max_bucket`` uses the largest bucket's choice.
    ``keep_dense="auto"`` keeps the dense weight only for layers where some bucket measured faster
    dense; ``"never"`` always runs sparse (least memory: 0.5625x of dense for bf16).
    ``calibrate=False`` skips the measurements (cached choices are still used; otherwise the
    default algorithm, always sparse).
    """

    min_bucket: int = 16
    max_bucket: int = 8192
    keep_dense: str = "auto"
    calibrate: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("min_bucket", "max_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < TOKEN_MULTIPLE or value & (value - 1):
                raise ValueError(f"DispatchConfig.{name}={value!r}: need a power of two >= {TOKEN_MULTIPLE}")
        if self.max_bucket < self.min_bucket:
            raise ValueError(f"DispatchConfig: max_bucket {self.max_bucket} < min_bucket {self.min_bucket}")
        if self.keep_dense not in ("auto", "never"):
            raise ValueError(f"DispatchConfig.keep_dense={self.keep_dense!r}: use 'auto' or 'never'")

    @property
    def buckets(self) -> tuple[int, ...]:
        out, b = [], self.min_bucket
        while b <= self.max_bucket:
            out.append(b)
            b *= 2
        return tuple(out)


def token_bucket(tokens: int, min_bucket: int = 16) -> int:
    """The power of two >= tokens (at least ``min_bucket``)."""
    return max(min_bucket, 1 << max(0, int(tokens) - 1).bit_length())


def padded_tokens(tokens: int) -> int:
    return max(TOKEN_MULTIPLE, -(-int(tokens) // TOKEN_MULTIPLE) * TOKEN_MULTIPLE)


# ---------------------------------------------------------------------------------------------
# Kernel choices and the algorithm cache (memory + JSON on disk)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelChoice:
    """What runs for one (device, shape, bucket, dtype): dense cuBLAS or cuSPARSELt with this config."""

    use_dense: bool = False
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1
    dense_ms: float | None = None
    sparse_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.dense_ms and self.sparse_ms:
            return self.dense_ms / self.sparse_ms
        return None


DEFAULT_CHOICE = KernelChoice()


def shape_key(device_name: str, out_features: int, in_features: int, dtype: torch.dtype) -> str:
    dt = str(dtype).replace("torch.", "")
    return f"{device_name}|torch {torch.__version__}|{out_features}x{in_features}|{dt}"


class AlgorithmCache:
    """Kernel choices keyed by device name + torch version + weight shape + token bucket + dtype.

    Lookups are in memory; :meth:`put` writes through to ``DIR/kernel_plans.json`` (merged with what
    other processes wrote meanwhile, replaced atomically), which a new instance reads on first use.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        default = Path(os.environ.get("SPARSEFORGE_CACHE", Path.home() / ".cache" / "sparseforge"))
        self.dir = Path(cache_dir if cache_dir is not None else default).expanduser()
        self.path = self.dir / CACHE_FILE
        self._by_shape: dict[str, dict[int, KernelChoice]] = {}
        self._loaded = False
        self._lock = threading.Lock()

    @staticmethod
    def _split(key: str) -> tuple[str, int]:
        head, _, bucket = key.rpartition("|bucket ")
        return head, int(bucket)

    @staticmethod
    def _parse(entry: dict) -> KernelChoice:
        fields = KernelChoice.__dataclass_fields__
        return KernelChoice(**{k: v for k, v in entry.items() if k in fields})

    def _read_file(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable kernel cache %s (%s)", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}  # choices made under an older dispatch rule: measure again
        return data.get("entries", {})

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            for key, entry in self._read_file().items():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    head, bucket = self._split(key)
                    self._by_shape.setdefault(head, {})[bucket] = self._parse(entry)
            self._loaded = True

    def get(self, skey: str, bucket: int) -> KernelChoice | None:
        self._ensure_loaded()
        return self._by_shape.get(skey, {}).get(bucket)

    def buckets(self, skey: str) -> dict[int, KernelChoice]:
        self._ensure_loaded()
        return self._by_shape.get(skey, {})

    def lookup(self, skey: str, tokens: int) -> KernelChoice | None:
        """The choice for the smallest calibrated bucket holding ``tokens`` (else the largest)."""
        table = self.buckets(skey)
        if not table:
            return None
        bucket = token_bucket(tokens)
        if bucket in table:
            return table[bucket]
        larger = [b for b in table if b >= bucket]
        return table[min(larger)] if larger else table[max(table)]

    def put(self, skey: str, bucket: int, choice: KernelChoice, persist: bool = True) -> None:
        self._ensure_loaded()
        with self._lock:
            self._by_shape.setdefault(skey, {})[bucket] = choice
            _CHOICE_MEMO.clear()
            if persist:
                self._write({f"{skey}|bucket {bucket}": asdict(choice)})

    def _write(self, new_entries: dict[str, dict]) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            entries = self._read_file()
            entries.update(new_entries)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".kernel_plans-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: readers never see half a file
        except OSError as exc:
            log.warning("could not write kernel cache %s (%s); choices stay in memory only", self.path, exc)

    def clear_memory(self) -> None:
        with self._lock:
            self._by_shape.clear()
            self._loaded = False


_CACHES: dict[str, AlgorithmCache] = {}


def algorithm_cache(cache_dir: str | Path | None = None) -> AlgorithmCache:
    """The process-wide cache for ``cache_dir`` (default: ``$SPARSEFORGE_CACHE``)."""
    key = str(cache_dir) if cache_dir is not None else "env:" + os.environ.get("SPARSEFORGE_CACHE", "")
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES.setdefault(key, AlgorithmCache(cache_dir))
    return cache


# ---------------------------------------------------------------------------------------------
# Kernel support and the raw kernels
# ---------------------------------------------------------------------------------------------

@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def sparse_unsupported_reason(weight: Tensor) -> str | None:
    """Why ``weight`` (Linear layout) cannot go to the sparse kernel, or None if it can."""
    if weight.device.type != "cuda":
        return f"device {weight.device.type} has no sparse tensor cores"
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).replace('torch.', '')} is not bf16/fp16"
    major, _ = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"compute capability {major}.x < 8.0"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    out_f, in_f = weight.shape
    if out_f % WEIGHT_MULTIPLE or in_f % WEIGHT_MULTIPLE:
        return f"shape {tuple(weight.shape)} is not a multiple of {WEIGHT_MULTIPLE}"
    return None


def compress(weight: Tensor) -> Tensor:
    """cuSPARSELt-compressed form of a 2:4 weight in Linear layout (values + metadata)."""
    return torch._cslt_compress(weight.contiguous())


def decompress(packed: Tensor, in_features: int) -> Tensor:
    """The dense (out, in) weight back from its compressed form: W = W @ I, exact."""
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return torch._cslt_sparse_mm(packed, eye)


def _cslt_linear_2d(x2d: Tensor, packed: Tensor, bias: Tensor | None, choice: KernelChoice) -> Tensor:
    tokens = x2d.shape[0]
    padded = padded_tokens(tokens)
    if padded != tokens:
        x2d = F.pad(x2d, (0, 0, 0, padded - tokens))
    if bias is not None and bias.dtype != x2d.dtype:
        bias = bias.to(x2d.dtype)
    # y^T = W x^T: the structured operand is the first; transpose_result makes the kernel write y.
    y = torch._cslt_sparse_mm(packed, x2d.t(), bias=bias, transpose_result=True, alg_id=choice.alg_id,
                              split_k=choice.split_k, split_k_mode=choice.split_k_mode)
    return y[:tokens] if padded != tokens else y


_FAILED_CHOICES: set[tuple] = set()


def sparse_linear_2d(x2d: Tensor, packed: Tensor, bias: Tensor | None, choice: KernelChoice) -> Tensor:
    """``x2d @ W^T + bias`` on cuSPARSELt; a configuration the library refuses falls back to alg 0."""
    key = (tuple(packed.shape), x2d.shape[0], choice.alg_id, choice.split_k, choice.split_k_mode)
    if key not in _FAILED_CHOICES:
        try:
            return _cslt_linear_2d(x2d, packed, bias, choice)
        except RuntimeError as exc:  # cuSPARSELt refuses before launching: nothing ran
            if choice == DEFAULT_CHOICE:
                raise
            _FAILED_CHOICES.add(key)
            warnings.warn(f"sparse kernel config {choice} failed for {tuple(x2d.shape)} ({exc}); "
                          f"using the default algorithm", stacklevel=2)
    return _cslt_linear_2d(x2d, packed, bias, DEFAULT_CHOICE)


# ---------------------------------------------------------------------------------------------
# The custom op
# ---------------------------------------------------------------------------------------------

_UNCALIBRATED_WARNED: set[str] = set()
# (device index, out, in, dtype, bucket) -> choice: keeps the per-call Python cost (which matters
# when no CUDA graph hides it) to one dict lookup. Cleared whenever the cache learns a choice.
_CHOICE_MEMO: dict[tuple, KernelChoice] = {}


def _dispatch(x2d: Tensor, out_features: int) -> KernelChoice:
    key = (x2d.device.index, out_features, x2d.shape[1], x2d.dtype, token_bucket(x2d.shape[0]))
    choice = _CHOICE_MEMO.get(key)
    if choice is not None:
        return choice
    skey = shape_key(device_name(x2d.device), out_features, x2d.shape[1], x2d.dtype)
    choice = algorithm_cache().lookup(skey, x2d.shape[0])
    if choice is None:
        if skey not in _UNCALIBRATED_WARNED:
            _UNCALIBRATED_WARNED.add(skey)
            log.warning("no measured kernel choice for %s: using the default cuSPARSELt algorithm", skey)
        choice = DEFAULT_CHOICE
    _CHOICE_MEMO[key] = choice
    return choice


@torch.library.custom_op("sparseforge::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, packed: Tensor | None, dense_weight: Tensor | None, bias: Tensor | None,
                  out_features: int) -> Tensor:
    """``x @ W^T + bias`` for a 2:4 weight W (out_features x in).

    ``packed``: W compressed for cuSPARSELt, or None. ``dense_weight``: W in Linear layout, or
    None; needed where there is no packed weight (CPU, unsupported dtype) and where dispatch chose
    dense cuBLAS for the call's token bucket.
    """
    if packed is None or not x.is_cuda:
        if dense_weight is None:
            raise RuntimeError("sparse_linear: neither a compressed weight for this device nor a dense weight")
        return F.linear(x, dense_weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], out_features))
    choice = _dispatch(x2d, out_features)
    if choice.use_dense and dense_weight is not None:
        y = F.linear(x2d, dense_weight, bias)
    else:
        y = sparse_linear_2d(x2d, packed, bias, choice)
    return y.reshape(*x.shape[:-1], out_features)


@sparse_linear.register_fake
def _sparse_linear_fake(x: Tensor, packed: Tensor | None, dense_weight: Tensor | None, bias: Tensor | None,
                        out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, _, dense_weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, dense_weight)


def _backward(ctx, grad: Tensor):
    x, dense_weight = ctx.saved_tensors
    if dense_weight is None:
        raise RuntimeError(
            "sparse_linear: no gradient through a lowered layer without its dense weight; lowered models are "
            "for inference (run under torch.no_grad()), or lower with DispatchConfig(keep_dense='auto')"
        )
    grad_x = grad @ dense_weight
    grad2d = grad.reshape(-1, grad.shape[-1])
    grad_w = grad2d.t() @ x.reshape(-1, x.shape[-1])
    grad_b = grad2d.sum(0) if ctx.has_bias else None
    return grad_x, None, grad_w, grad_b, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Measuring: CUDA-graph replays, rotating inputs
# ---------------------------------------------------------------------------------------------

def _record_graph(fns: Sequence[Callable[[], object]], target_ms: float, pool=None) -> tuple[torch.cuda.CUDAGraph, int]:
    def each_once() -> None:
        for fn in fns:
            fn()

    warm_up(each_once)  # handles, workspaces, plans: outside the capture
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    each_once()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end) / len(fns), 1e-3)
    calls = int(min(64, max(len(fns), target_ms / estimate)))

    def cycle() -> None:  # outputs dropped as it goes, so the graph's memory holds one at a time
        for i in range(calls):
            fns[i % len(fns)]()

    graph, _ = capture(cycle, warmup=0, pool=pool)
    graph.replay()
    return graph, calls


def graph_times_ms(variants: Sequence[Sequence[Callable[[], object]]], target_ms: float = 4.0,
                   replays: int = 7) -> list[float]:
    """Median device time of one call of each variant (a list of calls cycling over rotated inputs,
    so the L2 does not hold the operands), from CUDA-graph replays.

    The variants' replays are interleaved round by round: clocks and temperature drift over a run,
    and timing one variant after the other put that drift into their ratio (two timings of the same
    kernel differed by 5-10 % on the H200 that way).
    """
    # One memory pool for all: the graphs replay one at a time and nobody reads their outputs, so
    # they may share memory, and many variants of a large GEMM do not hold one output each.
    pool = torch.cuda.graph_pool_handle()
    graphs = [_record_graph(fns, target_ms, pool) for fns in variants]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(replays):
        for (graph, calls), out in zip(graphs, times):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / calls)
    del graphs
    return [statistics.median(t) for t in times]


def rotation_copies(nbytes: int, device: torch.device, cap: int = 4) -> int:
    """How many copies of an operand of ``nbytes`` to cycle so that together they exceed 3x the L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(3 * l2 / max(nbytes, 1))))


def _candidate_choices(packed: Tensor, x_probe: Tensor, bias: Tensor | None, bucket: int) -> list[KernelChoice]:
    searched = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(RuntimeError):
            searched = int(torch._cslt_sparse_mm_search(packed, x_probe.t(), bias=bias, transpose_result=True))
    algs = {0, searched}
    max_alg = torch.backends.cusparselt.get_max_alg_id()
    # The library's search times each id once, on its own inputs; where the sparse kernel can win
    # (>= 1024 tokens) every id is also timed here, the same way as dense (rotated inputs, graphs).
    algs.update(range(min(int(max_alg) + 1 if max_alg else 4, MAX_ALGS if bucket >= 1024 else 4)))  # ids the library refuses are skipped
    choices = [KernelChoice(alg_id=a) for a in sorted(algs)]
    # Split-k only pays when the output has too few tiles to fill the GPU (small token counts);
    # tried with the default and the library's searched algorithm, each split-k mode.
    sms = torch.cuda.get_device_properties(packed.device).multi_processor_count
    if math.ceil(packed.shape[0] / 128) * math.ceil(bucket / 128) < 2 * sms:
        for alg in sorted({0, searched}):
            for split_k in (2, 4, 8):
                for mode in (-1, 0, 1):
                    choices.append(KernelChoice(alg_id=alg, split_k=split_k, split_k_mode=mode))
    return choices


def _runs(fn: Callable[[], object]) -> bool:
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def measure_bucket(weight: Tensor, packed: Tensor, bias: Tensor | None, bucket: int) -> KernelChoice:
    """Time dense cuBLAS and every candidate sparse config at ``bucket`` tokens; the fastest sparse
    config, timed again against dense alone, is dispatched if it beats dense by ``SPARSE_MIN_GAIN``
    (``SPARSE_MIN_GAIN_SMALL`` below ``SMALL_BUCKET`` tokens)."""
    out_f, in_f = weight.shape
    gen = torch.Generator(device=weight.device).manual_seed(bucket)
    n_x = rotation_copies(padded_tokens(bucket) * in_f * weight.element_size(), weight.device)
    xs = [torch.randn(bucket, in_f, device=weight.device, dtype=weight.dtype, generator=gen) for _ in range(n_x)]
    n_w = rotation_copies(weight.numel() * weight.element_size(), weight.device)
    weights = [weight] + [weight.clone() for _ in range(n_w - 1)]
    packs = [packed] + [packed.clone() for _ in range(n_w - 1)]
    n = max(n_x, n_w)

    candidates = [cand for cand in _candidate_choices(packed, xs[0], bias, bucket)
                  if _runs(functools.partial(_cslt_linear_2d, xs[0], packed, bias, cand))]
    variants = [[functools.partial(F.linear, xs[i % n_x], weights[i % n_w], bias) for i in range(n)]]
    variants += [[functools.partial(_cslt_linear_2d, xs[i % n_x], packs[i % n_w], bias, cand) for i in range(n)]
                 for cand in candidates]
    dense_ms, *sparse_ms = graph_times_ms(variants, target_ms=2.0, replays=5)
    if not candidates:
        return KernelChoice(use_dense=True, dense_ms=dense_ms)
    i = min(range(len(candidates)), key=sparse_ms.__getitem__)
    best = candidates[i]
    min_gain = SPARSE_MIN_GAIN_SMALL if bucket < SMALL_BUCKET else SPARSE_MIN_GAIN
    if sparse_ms[i] < dense_ms * (1.0 - min_gain):
        # The fastest of many noisy timings is biased low (up to ~40 candidates per bucket): the
        # winner is timed again against dense alone, twice, in both replay orders and with longer
        # graphs, and the pair less favourable to sparse decides. One such pair (2 ms graphs, 7
        # replays) still sent 22016x4096 at 256 tokens sparse, which kernels.py then timed at 0.95x:
        # near the crossover a wrong "sparse" costs speed, a wrong "dense" only a missed few %.
        pairs = [graph_times_ms([variants[0], variants[i + 1]], target_ms=4.0, replays=11),
                 graph_times_ms([variants[i + 1], variants[0]], target_ms=4.0, replays=11)[::-1]]
        dense_ms, sparse_ms[i] = min(pairs, key=lambda pair: pair[0] / pair[1])
    # Sparse only when it wins by a clear margin: two CUDA-graph timings of the same kernel differ by
    # a few percent, and near-ties decided by noise measured 0.93-0.97x on the H200.
    return KernelChoice(use_dense=sparse_ms[i] > dense_ms * (1.0 - min_gain), alg_id=best.alg_id,
                        split_k=best.split_k, split_k_mode=best.split_k_mode, dense_ms=dense_ms,
                        sparse_ms=sparse_ms[i])


def calibrate(weight: Tensor, packed: Tensor, bias: Tensor | None, config: DispatchConfig,
              cache: AlgorithmCache | None = None) -> dict[int, KernelChoice]:
    """The kernel choice of every bucket for this weight's (device, shape, dtype), measuring misses."""
    cache = cache or algorithm_cache(config.cache_dir)
    skey = shape_key(device_name(weight.device), weight.shape[0], weight.shape[1], weight.dtype)
    table = {}
    for bucket in config.buckets:
        choice = cache.get(skey, bucket)
        if choice is None and config.calibrate:
            if weight.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparseforge: cannot measure kernels during CUDA-graph capture; lower first")
            choice = measure_bucket(weight, packed, bias, bucket)
            cache.put(skey, bucket, choice)
            log.info("%s bucket %d: %s", skey, bucket, choice)
        if choice is not None:
            table[bucket] = choice
    if cache is not algorithm_cache():  # the op looks choices up in the default cache
        for bucket, choice in table.items():
            algorithm_cache().put(skey, bucket, choice, persist=False)
    return table


# ---------------------------------------------------------------------------------------------
# Kernel state of one weight, shared by SparseLinear and the graph pass
# ---------------------------------------------------------------------------------------------

@dataclass
class KernelState:
    """What a lowered layer holds: the compressed weight (or None) and whether it keeps the dense one."""

    packed: Tensor | None
    keep_dense: bool
    fallback_reason: str | None  # why the layer runs dense everywhere, or None
    dense_buckets: tuple[int, ...] = ()

    @property
    def kernel(self) -> str:
        return "dense-fallback" if self.packed is None else "cusparselt"

    def dense_up_to(self, buckets: Sequence[int]) -> int:
        """Token count up to which every call runs dense (0: none): the largest bucket B such that
        all measured buckets <= B chose dense. Lowered layers route such calls to ``F.linear``
        before the custom op, so Inductor sees a plain matmul there (layouts, fusion) and eager
        decode skips the op's dispatch cost; dense buckets further up still dispatch inside the op."""
        if self.packed is None or not self.keep_dense or not self.dense_buckets:
            return 0
        dense = set(self.dense_buckets)
        prefix = 0
        for bucket in sorted(buckets):
            if bucket not in dense:
                break
            prefix = bucket
        return prefix


def build_kernel_state(weight: Tensor, bias: Tensor | None, config: DispatchConfig) -> KernelState:
    """Compress a 2:4 weight (Linear layout) and settle its dispatch; dense fallback where unsupported."""
    reason = sparse_unsupported_reason(weight)
    if reason is not None:
        return KernelState(packed=None, keep_dense=True, fallback_reason=reason)
    weight = weight.detach().contiguous()
    packed = compress(weight)
    table = calibrate(weight, packed, None if bias is None else bias.detach(), config)
    dense_buckets = tuple(b for b, c in sorted(table.items()) if c.use_dense)
    keep = config.keep_dense == "auto" and bool(dense_buckets)
    return KernelState(packed=packed, keep_dense=keep, fallback_reason=None, dense_buckets=dense_buckets)


def dense_wins_everywhere(state: KernelState, config: DispatchConfig) -> bool:
    """The measured dispatch picked dense cuBLAS at every token bucket: lowering the layer would only
    add the sparse op's call overhead, so lowering passes leave it a dense Linear."""
    return bool(config.buckets) and state.dense_up_to(config.buckets) == max(config.buckets)


def tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------

class SparseLinear(nn.Module):
    """A hardened N:M Linear lowered for inference: ``y = x W^T + b`` through ``sparse_linear``.

    Holds W compressed for cuSPARSELt on a supporting GPU, plus the dense W only where dispatch
    needs it; elsewhere (CPU, fp32, odd shapes) the masked dense W. ``state_dict()`` has the same
    keys and layout as the layer it replaced (``weight`` dense, ``bias``), so checkpoints stay
    portable; moving or casting the module (``.to()``, ``.cuda()``, ``.half()``) recompresses.
    """

    def __init__(self, in_features: int, out_features: int, pattern: NMPattern | str = "2:4", *,
                 layer: str = "", transposed_source: bool = False, config: DispatchConfig | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.pattern = NMPattern.parse(pattern)
        self.layer = layer
        self.transposed_source = transposed_source  # came from a GPT-2 Conv1D: state_dict keeps (in, out)
        self.config = config or DispatchConfig()
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("dense_weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.state = KernelState(packed=None, keep_dense=True, fallback_reason="not initialised")
        self.dense_up_to = 0  # calls with at most this many tokens run F.linear (KernelState.dense_up_to)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, pattern: NMPattern | str = "2:4", *,
                   layer: str = "", transposed: bool = False, config: DispatchConfig | None = None) -> SparseLinear:
        """Lower a hardened weight. ``weight`` is (out, in), or (in, out) with ``transposed=True``
        (GPT-2 Conv1D). Raises :class:`NMViolationError` naming ``layer`` if it is not N:M."""
        w = weight.detach()
        w = w.t() if transposed else w
        if w.dim() != 2:
            raise ValueError(f"{layer or 'layer'}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        module = cls(w.shape[1], w.shape[0], pattern, layer=layer, transposed_source=transposed, config=config)
        module._install(w, None if bias is None else bias.detach())
        return module

    def _install(self, weight: Tensor, bias: Tensor | None) -> None:
        check_nm(weight, self.pattern, self.layer or "layer")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.layer or 'layer'}: weight {tuple(weight.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        state = build_kernel_state(weight, bias, self.config)
        self.state = state
        self.dense_up_to = state.dense_up_to(self.config.buckets)
        self.packed = state.packed
        self.dense_weight = weight.contiguous() if state.keep_dense else None
        self.bias = bias

    def materialize_weight(self) -> Tensor:
        """The dense (out, in) weight, from the kept copy or decompressed."""
        if self.dense_weight is not None:
            return self.dense_weight
        if self.packed is None:
            raise RuntimeError(f"{self.layer or 'SparseLinear'}: holds no weight")
        return decompress(self.packed, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_up_to and x.numel() <= self.dense_up_to * x.shape[-1]:  # tokens <= dense_up_to
            return F.linear(x, self.dense_weight, self.bias)
        return torch.ops.sparseforge.sparse_linear(x, self.packed, self.dense_weight, self.bias, self.out_features)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes held for the weight, split by form, and what the dense weight takes."""
        held = self.packed if self.packed is not None else self.dense_weight
        sparse = self.packed is not None
        return {"compressed": tensor_bytes(self.packed),
                "dense_copy": tensor_bytes(self.dense_weight) if sparse else 0,
                "dense_fallback": 0 if sparse else tensor_bytes(self.dense_weight),
                "dense_reference": self.out_features * self.in_features * held.element_size()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"kernel={self.state.kernel}, dense_copy={self.dense_weight is not None and self.packed is not None}, "
                f"bias={self.bias is not None}")

    # --- moving, casting and checkpoints go through the dense weight: the packed bytes hold
    # metadata that a cast or a CPU copy would corrupt.
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        held = self.packed if self.packed is not None else self.dense_weight
        if held is None:
            return self
        probe = fn(torch.empty(0, dtype=held.dtype, device=held.device))
        if probe.device == held.device and probe.dtype == held.dtype:
            return self  # nothing moves or changes type
        weight, bias = self.materialize_weight(), self.bias
        self.packed = self.dense_weight = None
        new_weight = fn(weight)
        self._install(new_weight, None if bias is None else fn(bias))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        weight = self.materialize_weight()
        weight = weight.t() if self.transposed_source else weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        weight = weight.t() if self.transposed_source else weight
        bias = state_dict.get(prefix + "bias")
        device = self.packed.device if self.packed is not None else (
            self.dense_weight.device if self.dense_weight is not None else weight.device)
        dtype = self.packed.dtype if self.packed is not None else (
            self.dense_weight.dtype if self.dense_weight is not None else weight.dtype)
        try:
            self._install(weight.to(device=device, dtype=dtype),
                          None if bias is None else bias.to(device=device, dtype=dtype))
        except (ValueError, RuntimeError) as exc:
            error_msgs.append(str(exc))
