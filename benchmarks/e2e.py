"""End to end: a LLaMA-7B-shaped decoder stack with random 2:4 weights, ours vs Inductor dense.

transformers' LlamaConfig (hidden 4096, intermediate 11008, 32 heads, 4 layers, vocab 32000) in
bf16 on one GPU. Every Linear inside the decoder layers is 2:4 (magnitude-pruned random init; the
lm_head and embeddings stay dense, as after hardening). Both models run under
``torch.compile``: dense is plain Inductor, ours is ``sparseforge_compile.compile`` (lowering, then
Inductor) or ``torch.compile(backend="sparseforge")``.

- prefill: B x S prompt tokens, logits of the last position only (as ``generate`` asks), no cache.
- decode: one new token per sequence against a static KV cache holding ``--kv`` tokens.

Times are medians of CUDA-graph replays of one compiled call (``--timing graph``, the default: device
time only, both models compiled without Inductor's own CUDA graphs) or of CUDA-event timings around
each call (``--timing calls``, with ``--mode reduce-overhead``); inputs rotated. Also reports the weight memory of the
lowered layers (dispatch as measured, and with ``keep_dense="never"``) and checks the logits.

``--layout compact`` lowers to the decode layout alone (0.5625x the dense bytes, the decode kernel at
every token count); ``--layout both`` measures it per bucket against cuSPARSELt and dense. Every speed
row carries the lowered layers' ``memory_ratio``.

    python -m benchmarks.e2e                 # writes benchmarks/results/e2e.json
    python -m benchmarks.e2e --layout compact --paths lower --out benchmarks/results/e2e_compact.json
    python -m benchmarks.e2e --smoke         # tiny model on the CPU, a temporary results file
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import sys
import time

import torch
from torch import nn

import sparseforge_compile
from benchmarks.common import results_path, write_results
from sparseforge_compile.lowering.cuda_graphs import capture
from sparseforge_compile.lowering.dispatch import DispatchConfig
from sparseforge_compile.lowering.lower import lower_model
from sparseforge_compile.masks import NMPattern, nm_mask


def build_model(layers: int, device: str, dtype: torch.dtype, tiny: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4,
                vocab_size=256) if tiny else dict(hidden_size=4096, intermediate_size=11008,
                                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    registry = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.mul_(nm_mask(module.weight.abs(), NMPattern(2, 4)))
                registry[name] = {"pattern": "2:4", "transposed": False}
    model._sparseforge_layers = registry  # what hardening leaves on a model
    return model


def timed(fn, inputs: list, warmup: int = 3, iters: int = 10) -> float:
    """Median ms of ``iters`` calls after ``warmup`` calls; call i gets ``inputs[i % len(inputs)]``."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(warmup):
        torch.compiler.cudagraph_mark_step_begin()
        fn(*inputs[i % len(inputs)])
    sync()
    times = []
    for i in range(warmup, warmup + iters):
        torch.compiler.cudagraph_mark_step_begin()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def graph_timed(fn, inputs: list, warmup: int = 3, iters: int = 10) -> float:
    """Median ms of ``iters`` CUDA-graph replays of one ``fn`` call (compiled without CUDA graphs): warm-up
    calls on a side stream (they compile) and one captured call, all on ``inputs[0]``, then replays with
    ``inputs[i]`` copied into the captured input buffers first. Only device time counts, for dense and
    ours alike, so a host-bound harness (guards, cache bookkeeping) cannot decide a decode comparison."""
    static = [t.clone() for t in inputs[0]]

    def load(i: int) -> None:
        for buf, t in zip(static, inputs[i % len(inputs)]):
            buf.copy_(t)

    graph, _ = capture(lambda: fn(*static), warmup=warmup)  # the warm-ups compile
    times = []
    for i in range(warmup, warmup + iters):
        load(i)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prefill_fn(model):
    def run(ids):
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    return run


def decode_setup(model, batch: int, kv: int, steps: int, vocab: int, device: str):
    """A static cache holding ``kv`` prompt tokens (filled eagerly, uncompiled) and the inputs of
    ``steps`` decode steps, step i at position kv + i (the cache grows as in generation)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=kv + steps)
    gen = torch.Generator(device="cpu").manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, kv), generator=gen).to(device)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    inputs = []
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
        position = torch.full((batch, 1), kv + step, device=device, dtype=torch.long)
        inputs.append((ids, position, torch.tensor([kv + step], device=device)))
    return cache, inputs


def decode_fn(model, cache):
    # transformers < 5.2x takes cache_position; later versions track the position inside the cache.
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def run(ids, position, cache_position):
        extra = {"cache_position": cache_position} if takes_cache_position else {}
        return model(input_ids=ids, past_key_values=cache, position_ids=position, use_cache=True, **extra).logits
    return run


def recording_backend(dispatch: DispatchConfig):
    """--dry-run: the lowering pass alone (no Inductor), to check the backend path on the CPU."""
    from sparseforge_compile.passes.lower_sparse import LowerSparseLinears

    def backend(gm, example_inputs):
        LowerSparseLinears(dispatch=dispatch)(gm, example_inputs)
        return gm.forward
    return backend


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", default="4x2048,1x2048", help="BxS prefill shapes")
    parser.add_argument("--decode-batches", default="1,4,16,64")
    parser.add_argument("--kv", type=int, default=512, help="tokens already in the KV cache at decode")
    parser.add_argument("--timing", choices=["graph", "calls"], default="graph",
                        help="graph: replay one captured call as a CUDA graph (device time only, models compiled "
                             "without CUDA graphs); calls: CUDA events around each call")
    parser.add_argument("--mode", default=None,
                        help="torch.compile mode for both models (default: none with --timing graph, "
                             "reduce-overhead with --timing calls)")
    parser.add_argument("--dynamic", choices=["auto", "true", "false"], default="true",
                        help="torch.compile dynamic= for both (true: one graph per phase, no recompiles)")
    parser.add_argument("--paths", default="lower,backend",
                        help="ours as sparseforge_compile.compile (lower: module swap, then Inductor) and/or "
                             "torch.compile(backend='sparseforge') (backend: graph pass, sibling Linears fused)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model on the CPU, Dynamo without Inductor: checks the script, times nothing real")
    parser.add_argument("--layout", default="cusparselt", choices=["cusparselt", "compact", "both"],
                        help="DispatchConfig.layout of ours (compact: the decode layout alone)")
    parser.add_argument("--keep-dense", default="auto", choices=["auto", "never"])
    parser.add_argument("--smoke", action="store_true",
                        help="--dry-run at tiny sizes, 2 iterations, written to a temporary file unless --out")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/e2e.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dry_run, args.iters, args.prefill, args.decode_batches, args.kv = True, 2, "2x32", "1,4", 16
    dispatch = DispatchConfig(layout=args.layout, keep_dense=args.keep_dense)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("e2e.py needs a CUDA GPU; use --dry-run to check it on the CPU")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    mode = None if args.dry_run else (args.mode or ("reduce-overhead" if args.timing == "calls" else None))
    graph_timing = args.timing == "graph" and not args.dry_run

    def time_pair(runs: dict, inputs: dict, iters: int) -> tuple[dict, str]:
        """Median ms of each ``runs[name]`` on ``inputs[name]``, all by the same timing method."""
        if graph_timing:
            try:
                return {name: graph_timed(fn, inputs[name], iters=iters) for name, fn in runs.items()}, "graph"
            except Exception as exc:  # report it, then time every variant by calls instead
                print(f"CUDA-graph capture failed ({type(exc).__name__}: {exc}); timing calls", flush=True)
                torch.cuda.synchronize()
        return {name: timed(fn, inputs[name], iters=iters) for name, fn in runs.items()}, "calls"
    name_out = "e2e_dry_run" if args.dry_run else "e2e"
    out_path = results_path(name_out, args.out, args.smoke) if (args.out or args.smoke) else None

    dense = build_model(args.layers, device, dtype, tiny=args.dry_run)
    vocab = dense.config.vocab_size
    ours = copy.deepcopy(dense)
    lean = copy.deepcopy(dense)
    prefills = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",")]
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {bs: [(torch.randint(0, vocab, bs, generator=gen).to(device),) for _ in range(3)] for bs in prefills}
    with torch.no_grad():
        reference = {bs: prefill_fn(dense)(*inputs[bs][0]) for bs in prefills}

    t0 = time.perf_counter()
    backend = "eager" if args.dry_run else "inductor"
    # Three models of one class share their forwards' code objects, so Dynamo counts every (model,
    # shape) entry against one per-code limit (8): the last run hit it at the backend's batch-1 decode,
    # which then ran eager (0.73x). Six shapes x three models need more room than that.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    dense_c = torch.compile(dense, backend=backend, mode=mode, dynamic=dynamic)
    ours_c = sparseforge_compile.compile(ours, backend=backend, mode=mode, dynamic=dynamic, dispatch=dispatch)
    report = ours_c._sparseforge_report
    paths = args.paths.split(",")
    variants = {"lower": ours_c} if "lower" in paths else {}
    if "backend" in paths:
        graph_model = copy.deepcopy(dense)
        variants["backend"] = (torch.compile(graph_model, backend=recording_backend(dispatch), dynamic=dynamic)
                               if args.dry_run else
                               sparseforge_compile.compile(graph_model, via="backend", mode=mode, dynamic=dynamic,
                                                           dispatch=dispatch))
    lean_report = lower_model(lean, config=DispatchConfig(keep_dense="never"))
    lower_s = time.perf_counter() - t0
    print(report.summary(), flush=True)

    rows = []
    for name, rep in ((f"layout {args.layout}, keep_dense {args.keep_dense}", report),
                      ("cusparselt only (keep_dense='never')", lean_report)):
        rows.append({"bench": "memory", "config": f"llama-7b-shaped x{args.layers} layers, {name}",
                     "lowered_layers": len(rep.layers), "sparse_layers": rep.sparse_layers,
                     "dense_copies": sum(layer.dense_copy for layer in rep.layers),
                     "held_bytes": rep.held_bytes, "dense_bytes": rep.dense_bytes,
                     "ratio": round(rep.memory_ratio, 4)})
    del lean

    with torch.no_grad():
        for batch, seq in prefills:
            t1 = time.perf_counter()
            runs = {"dense": prefill_fn(dense_c), **{path: prefill_fn(m) for path, m in variants.items()}}
            ms, timing = time_pair(runs, {name: inputs[(batch, seq)] for name in runs}, args.iters)
            for path, model_c in variants.items():
                torch.compiler.cudagraph_mark_step_begin()
                err = rel_err(prefill_fn(model_c)(*inputs[(batch, seq)][0]), reference[(batch, seq)])
                rows.append({"bench": "e2e", "config": f"llama-7b-shaped x{args.layers} via {path}", "path": path,
                             "phase": "prefill", "batch": batch, "seq": seq, "dense_ms": round(ms["dense"], 4),
                             "sparse_ms": round(ms[path], 4), "speedup": round(ms["dense"] / ms[path], 4),
                             "timing": timing, "logits_rel_err": err, "layout": args.layout,
                             "memory_ratio": round(report.memory_ratio, 4),
                             "wall_s_incl_compile": round(time.perf_counter() - t1, 1)})
                print(rows[-1], flush=True)
            write_results(name_out, rows, out_path or args.out, extra={"partial": True}, settings=vars(args))
        for batch in [int(b) for b in args.decode_batches.split(",")]:
            t1 = time.perf_counter()
            steps = 3 + 2 * args.iters + 1
            caches, runs, step_inputs = {}, {}, {}
            for name, source, model_c in [("dense", dense, dense_c)] + [
                    (path, ours if path == "lower" else graph_model, m) for path, m in variants.items()]:
                caches[name], step_inputs[name] = decode_setup(source, batch, args.kv, steps, vocab, device)
                runs[name] = decode_fn(model_c, caches[name])
            ms, timing = time_pair(runs, {name: inputs_[:-1] for name, inputs_ in step_inputs.items()},
                                   2 * args.iters)
            # one more step each, same tokens and history: the variants' logits against dense's
            torch.compiler.cudagraph_mark_step_begin()
            want = runs["dense"](*step_inputs["dense"][-1]).clone()
            for path in variants:
                torch.compiler.cudagraph_mark_step_begin()
                err = rel_err(runs[path](*step_inputs[path][-1]), want)
                rows.append({"bench": "e2e", "config": f"llama-7b-shaped x{args.layers} via {path}", "path": path,
                             "phase": "decode", "batch": batch, "seq": 1, "kv_len": args.kv,
                             "dense_ms": round(ms["dense"], 4), "sparse_ms": round(ms[path], 4),
                             "speedup": round(ms["dense"] / ms[path], 4), "timing": timing,
                             "logits_rel_err": err, "layout": args.layout, "memory_ratio": round(report.memory_ratio, 4),
                             "wall_s_incl_compile": round(time.perf_counter() - t1, 1)})
                print(rows[-1], flush=True)
            write_results(name_out, rows, out_path or args.out, extra={"partial": True}, settings=vars(args))
            del caches, runs

    extra = {"mode": mode, "timing": args.timing, "dynamic": dynamic, "lowering_s": round(lower_s, 1), "lowering": report.to_dict()}
    path = write_results(name_out, rows, out_path or args.out, extra=extra, settings=vars(args))
    print(f"\nwrote {path}")
    for r in rows:
        if r["bench"] == "e2e":
            print(f"{r['path']:8s} {r['phase']:8s} B={r['batch']:<3d} S={r['seq']:<5d} dense {r['dense_ms']:8.3f} ms  "
                  f"ours {r['sparse_ms']:8.3f} ms  {r['speedup']:.3f}x  err {r['logits_rel_err']:.1e}")
        else:
            print(f"memory  {r['config']}: {r['ratio']:.4f}x of dense ({r['dense_copies']} dense copies)")


if __name__ == "__main__":
    main()
