"""Does the annealing loop's graph compute what the plain model computes, under the loop's autocast?

The trained methods differ in what they run: the peer (``sparsegpt+kd``) trains the plain Hugging Face
model, SparseForge the captured graph (``capture`` -> ``UseCausalAttention`` -> ``InsertMasks``). Both
run under bf16 autocast on a GPU. This script feeds one batch of C4 text through each, at the same
weights, and reports the KL of each bf16 forward to the fp32 plain model and the cosine between each
path's gradient on the kept weights and the plain model's (the KD loss to the fp32 logits).
Equal numbers mean the two methods train the same function.

    python -m benchmarks.graph_numerics [--model smollm2-135m] [--batch 4] [--seqlen 512] [--precision fp32]
    python -m benchmarks.graph_numerics --rotary matmul-5.1x   # transformers 5.1x's rotary code, on any version

``--rotary matmul-5.1x`` swaps in the rotary embedding as transformers 5.1x wrote it (a matmul inside
an autocast-off region that export drops): what the GPU machine runs (5.17), reproducible on a CPU
with a newer transformers, whose rotary multiplies elementwise and so never showed the bug.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from tabulate import tabulate

from benchmarks.common import write_results
from sparseforge_compile.capture import capture
from sparseforge_compile.data import calibration_windows
from sparseforge_compile.distill import kd_loss
from sparseforge_compile.evaluate import logits_of
from sparseforge_compile.masks import NMPattern, nm_mask
from sparseforge_compile.models import load_model
from sparseforge_compile.passes.causal_attention import UseCausalAttention
from sparseforge_compile.passes.float32_positions import PINNED
from sparseforge_compile.passes.insert_masks import InsertMasks


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def autocast_off_if_on(device_type: str):
    """What transformers' ``maybe_autocast(enabled=False)`` does: nothing unless autocast is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()  # 5.1x has it too, and export turns it into a region with its own subgraph
def old_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRotaryEmbedding.forward as transformers 5.1x wrote it (5.17, checked against its source)."""
    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
    with autocast_off_if_on(x.device.type):
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _unpinned(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as capture made it before KeepPositionMathInFloat32: its pinned matmuls back to the
    plain aten ops (autocast applies to them again)."""
    plain_ops = {pinned: op for op, pinned in PINNED.items()}
    for sub in [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]:  # regions' subgraphs too
        for node in sub.graph.nodes:
            if node.op == "call_function" and node.target in plain_ops:
                node.target = plain_ops[node.target]
        sub.recompile()
    return gm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="the forwards' precision: bf16 autocast (what the loop trains with on a GPU) or fp32")
    p.add_argument("--rotary", default="installed", choices=("installed", "matmul-5.1x"),
                   help="the installed transformers' rotary code, or 5.1x's (matmul in an autocast-off region)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a graph the loop trains differs from the plain model (the gate before training on a GPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rotary == "matmul-5.1x":
        from transformers.models.llama import modeling_llama

        modeling_llama.LlamaRotaryEmbedding.forward = old_rotary_forward
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device)
    model, tok = loaded.model.eval(), loaded.tokenizer
    ids = calibration_windows(tok, args.batch, args.seqlen, seed=1).to(device)
    with torch.no_grad():  # 2:4 by magnitude on every decoder Linear, so the masked graph has real masks
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.mul_(nm_mask(mod.weight.abs(), NMPattern(2, 4)))
        ref = logits_of(model, ids).float()

    graph = capture(model, ids[:, :16]).gm
    unpinned = _unpinned(capture(model, ids[:, :16]).gm)
    causal = capture(model, ids[:, :16]).gm
    UseCausalAttention()(causal)
    masked = capture(model, ids[:, :16]).gm
    UseCausalAttention()(masked)
    states = InsertMasks("2:4", init="magnitude")(masked).masks
    for ms in states.values():
        ms.set_hard(ms.hard_mask())  # magnitude's 2:4 of the (already pruned) weights: the same zeros
    def plain_training(x: torch.Tensor) -> torch.Tensor:  # the loop trains with the model in train()
        model.train()
        try:
            return logits_of(model, x)
        finally:
            model.eval()

    paths = {"plain model": lambda x: logits_of(model, x), "plain model, train()": plain_training,
             "captured graph": lambda x: _logits(graph(x)),
             "captured graph, position math not pinned": lambda x: _logits(unpinned(x)),
             "+ causal attention": lambda x: _logits(causal(x)), "+ masks (SparseForge's graph)": lambda x: _logits(masked(x))}

    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    rows, base_grads = [], None
    for name, fn in paths.items():
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = fn(ids)
        loss = kd_loss(logits.float(), ref, ids, ce_weight=0.0)[0]
        with torch.no_grad():  # by position: an error that grows along the sequence points at positions
            by_position = {f"kl_pos_{lo}_{hi}": round(float(kd_loss(logits[:, lo:hi].float(), ref[:, lo:hi],
                                                                      ids[:, lo:hi], ce_weight=0.0)[0]), 6)
                           for lo, hi in ((0, 32), (32, 128), (128, args.seqlen)) if hi <= args.seqlen}
        loss.backward()
        # Kept weights only: the plain model also has gradients where the mask is 0 (the peer re-zeroes
        # those weights after each step), the masked graph does not.
        grads = torch.cat([w.grad[w != 0].double() for w in weights])
        base_grads = grads if base_grads is None else base_grads
        cos = float(torch.nn.functional.cosine_similarity(grads, base_grads, dim=0))
        rows.append({"path": name, "device": str(device), "logits_dtype": str(logits.dtype).replace("torch.", ""),
                     "precision": args.precision, "rotary": args.rotary,
                     "kl_to_fp32": round(float(loss), 6), **by_position, "grad_norm": round(float(grads.norm()), 6),
                     "grad_cos_to_plain": round(cos, 6)})
        print(tabulate(rows[-1:], headers="keys", tablefmt="github"), flush=True)
    write_results("graph_numerics", rows, out=args.out, settings=vars(args))
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 1 if args.check and _mismatches(rows) else 0


def _mismatches(rows: list[dict]) -> list[str]:
    """The paths the loop trains (all but the deliberately unpinned one) whose KL to fp32 is not the
    plain model's (10 % + 1e-4 nats of slack for kernel choice), each with a message."""
    plain = rows[0]["kl_to_fp32"]
    bad = [f"{r['path']}: KL {r['kl_to_fp32']} against the plain model's {plain}" for r in rows
           if "not pinned" not in r["path"] and abs(r["kl_to_fp32"] - plain) > 0.1 * plain + 1e-4]
    for line in bad:
        print(f"MISMATCH {line}", file=sys.stderr)
    return bad


if __name__ == "__main__":
    sys.exit(main())
