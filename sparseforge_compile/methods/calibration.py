"""Sequential calibration, shared by every calibrated method (as the SparseGPT and Wanda references do it).

The inputs of the first decoder block are captured once; then every block collects its layers'
input statistics, is pruned, and is run again so that the next block sees the outputs of the pruned
model so far. Only one block's statistics exist at a time, and a block can be moved to the compute
device on its own while the rest of the model stays on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import reduce_input_stats
from ..errors import PruneError
from ..layers import find_decoder_blocks, weight_out_in
from .input_stats import LayerInputStats
from .result import LayerPruneStats, PrunedLayer


class BlockPruner(Protocol):
    """A calibrated method as the driver sees it."""

    name: str

    def new_stats(self, name: str, in_features: int) -> LayerInputStats:
        """The input statistics to collect for layer ``name``."""

    def prune_layers(self, names: list[str], collected: dict[str, LayerInputStats]) -> Iterator[PrunedLayer]:
        """Prune ``names`` in place from their statistics (popping them from ``collected``)."""


def validate_calib(model: nn.Module, calib: torch.Tensor | None, method: str) -> torch.Tensor:
    """``calib`` as ``(nsamples, seqlen)`` long token ids, refused unless the model can run it."""
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
def calibration_mode(model: nn.Module) -> Iterator[None]:
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
def _hooked_stats(layers: dict[str, nn.Module], method: BlockPruner) -> Iterator[dict[str, LayerInputStats]]:
    """Input statistics for ``layers``, filled by forward hooks while the ``with`` body runs data."""
    collected = {name: method.new_stats(name, int(weight_out_in(module).shape[1])) for name, module in layers.items()}
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
                       batch_size: int, method: BlockPruner) -> dict[str, LayerInputStats]:
    """Statistics of layers after the decoder blocks (a BERT MLM-head transform, OPT's project_out), from
    whole-model forwards of the calibration set through the blocks as pruned so far."""
    with _hooked_stats(layers, method) as collected:
        for start in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[start : start + batch_size].to(device))
    return collected


def _collect_block_stats(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module],
                         method: BlockPruner) -> dict[str, LayerInputStats]:
    with _hooked_stats(layers, method) as collected:
        _run_block(block, inputs, None)
    return collected


@torch.no_grad()
def prune_sequential(model: nn.Module, method: BlockPruner, targets: dict[str, nn.Module], calib: torch.Tensor,
                     batch_size: int, device: torch.device, progress: bool,
                     desc: str) -> tuple[dict[str, LayerPruneStats], dict[str, torch.Tensor]]:
    """Prune ``targets`` in place with ``method``, block by block; (statistics, keep-masks) in pruning order."""
    blocks_name, blocks = find_decoder_blocks(model)
    per_block, outside = _group_by_block(targets, blocks_name, len(blocks))
    last = max(per_block, default=-1)
    stats: dict[str, LayerPruneStats] = {}
    masks: dict[str, torch.Tensor] = {}

    def prune(names: list[str], collected: dict[str, LayerInputStats]) -> None:
        reduce_input_stats(collected)  # under torch.distributed: every rank's share of the windows
        for name, keep, layer_stats in method.prune_layers(names, collected):
            layer_stats.calibration_sequences = int(calib.shape[0])
            masks[name], stats[name] = keep, layer_stats

    def masks_home(names: list[str]) -> None:  # next to their weights, once a block is back on its device
        for name in names:
            masks[name] = masks[name].to(weight_out_in(targets[name]).device)

    # Layers outside the blocks that run before block 0 (an input projection) see the calibration data
    # on the way to it: pruned first, so that the blocks calibrate on their pruned outputs.
    with _hooked_stats({n: targets[n] for n in outside}, method) as collected:
        inputs = capture_block_inputs(model, blocks, calib, device, batch_size)
    before = [n for n in outside if collected[n].ntokens]
    after = [n for n in outside if not collected[n].ntokens]
    if after:
        _check_whole_model_on(model, after, device)  # before any weight changes
    try:
        if before:
            prune(before, collected)
            masks_home(before)
            del inputs
            inputs = capture_block_inputs(model, blocks, calib, device, batch_size)
        del collected
        spare = torch.empty_like(inputs.hidden)
        for index in tqdm(range(last + 1), desc=desc, disable=not progress, unit="block"):
            block = blocks[index]
            with _block_on(block, device):
                names = per_block.get(index, [])
                if names:
                    prune(names, _collect_block_stats(block, inputs, {n: targets[n] for n in names}, method))
                if index < last:
                    # The next block's inputs come from this block as pruned.
                    _run_block(block, inputs, spare)
                    inputs.hidden, spare = spare, inputs.hidden
            masks_home(names)
        del inputs, spare
        if after:  # layers after the blocks: one pass of the whole model, blocks pruned
            prune(after, _whole_model_stats(model, {n: targets[n] for n in after}, calib, device, batch_size,
                                            method))
            masks_home(after)
    except PruneError as exc:
        done = list(stats)  # in pruning order
        if done:
            raise PruneError(f"{exc} (the model is already pruned in {len(done)} layers up to {done[-1]}: "
                             f"reload it before retrying)") from exc
        raise
    return stats, masks
