"""``sparseforge-compile``: eval, report, prune, plan, recipe, generate.

Each subcommand parses its flags here and calls one function of the room that owns the work, so
the CLI and the Python API stay one code path. Errors users can act on (bad model name, missing
data, bad pattern) print one line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tabulate import tabulate

from .errors import SparseForgeError, UsageError
from .inputs import (
    check_at_least,
    check_generation_fits,
    check_output_file,
    pick_device,
    pick_windows,
    write_json,
)
from .models import SMOLLM2_NAME
from .prune_command import GPU_DEFAULTS, PRUNE_FLAGS, _flag, cmd_prune

USER_ERRORS: tuple[type[BaseException], ...] = (SparseForgeError, ValueError, FileNotFoundError)


# ------------------------------------------------------------------------------------------ eval

def cmd_eval(args: argparse.Namespace) -> int:
    from .eval_tasks import parse_tasks
    from .models import load_model

    tasks = parse_tasks(args.tasks)
    if not tasks:
        raise UsageError("--tasks names no task: give e.g. wikitext2,piqa,arc_easy")
    check_at_least("--batch-size", args.batch_size)
    check_at_least("--max-windows", args.max_windows, hint="leave it out to score every window")
    if args.json:
        check_output_file(args.json, "--json")
    if [t for t in tasks if t != PPL_TASK]:
        from .eval_tasks import check_tasks

        check_tasks([t for t in tasks if t != PPL_TASK], args.limit)
    device = pick_device(args.device)
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise UsageError(f"{args.model} ships no tokenizer: evaluation needs one")
    payload: dict = {"model": args.model, "device": device, "dtype": args.dtype}
    if PPL_TASK in tasks:
        payload["wikitext2"] = _eval_perplexity(args, loaded, device)
    others = [t for t in tasks if t != PPL_TASK]
    if others:
        from .eval_tasks import evaluate_tasks

        scores = evaluate_tasks(loaded.model, loaded.tokenizer, others, data_dir=args.data_dir, limit=args.limit,
                                batch_size=args.batch_size, progress=not args.quiet)
        print(scores["table"])
        payload["tasks"] = scores["results"]
        payload["tasks_limit"] = args.limit
    if args.json:
        write_json(args.json, payload)
    return 0


PPL_TASK = "wikitext2"  # the SparseGPT-protocol perplexity (lm-eval's "wikitext" is a word-level protocol)


def _eval_perplexity(args: argparse.Namespace, loaded, device: str) -> dict:
    from .data import eval_windows, load_wikitext2, tokenize
    from .evaluate import perplexity, perplexity_unsupported

    problem = perplexity_unsupported(loaded.model, args.seqlen)
    if problem:
        raise UsageError(f"{args.model}: {problem}")
    tokens = tokenize(loaded.tokenizer, load_wikitext2(args.split, args.data_dir))
    all_windows = eval_windows(tokens, args.seqlen)
    windows = all_windows[: pick_windows("--max-windows", args.max_windows, all_windows.shape[0])]
    result = perplexity(loaded.model, windows, batch_size=args.batch_size, total_windows=all_windows.shape[0],
                        progress=not args.quiet)
    scope = f"{result.windows} of {result.total_windows} windows" + (" (SUBSET)" if result.subset else "")
    rows = [["model", args.model], ["dataset", f"wikitext2 {args.split}"], ["seqlen", result.seqlen],
            ["windows", scope], ["tokens scored", result.tokens], ["device / dtype", f"{device} / {args.dtype}"],
            ["seconds", f"{result.seconds:.1f}"]]
    print(tabulate(rows, tablefmt="simple"))
    subset_note = f" on a subset ({result.windows}/{result.total_windows} windows)" if result.subset else ""
    print(f"WikiText-2 {args.split} perplexity{subset_note}: {result.ppl:.4f}")
    return {"dataset": "wikitext2", "split": args.split, **result.as_dict()}


# -------------------------------------------------------------------------------------- generate

def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import not_a_causal_lm
    from .models import load_model
    from .serving import Generator

    if not args.prompt.strip():
        raise UsageError("--prompt is empty: give the text to continue, e.g. --prompt 'The capital of France is'")
    check_at_least("--max-new-tokens", args.max_new_tokens)
    device = pick_device(args.device)
    path = Path(args.model).expanduser()
    if args.layout and not (path / "sparseforge.json").is_file():
        raise UsageError(f"--layout {args.layout} applies to sparse checkpoints; {args.model} is not one (drop it)")
    if args.layout:  # a sparse checkpoint lowered to the layout asked for
        from .checkpoint import load
        from .loaded import DTYPES
        from .lowering.dispatch import DispatchConfig

        loaded = load(path, device=device, dtype=DTYPES[args.dtype], dispatch=DispatchConfig(layout=args.layout))
    else:
        loaded = load_model(args.model, device=device, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.model} ships no tokenizer: generation needs one")
    problem = not_a_causal_lm(loaded.model)
    if problem:
        raise UsageError(f"{args.model}: {problem}, so it does not generate text")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"the tokenizer of {args.model} has no chat template: drop --chat")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                add_generation_prompt=True, return_tensors="pt")
    else:
        encoded = tokenizer(args.prompt, return_tensors="pt")
    input_ids = (encoded["input_ids"] if hasattr(encoded, "keys") else encoded).to(device)
    check_generation_fits(loaded.model, input_ids.shape[1], args.max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    compile_step = {"auto": None, "on": True, "off": False}[args.compile]
    gen = Generator(loaded.model, input_ids.shape[1] + args.max_new_tokens, compile=compile_step)
    with torch.no_grad():
        result = gen.generate(input_ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    new_tokens = result.sequences[0, input_ids.shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(text if args.chat else args.prompt + text)
    lowered = [m for m in loaded.model.modules() if hasattr(m, "state") and hasattr(m, "materialize_weight")]
    kernels = ",".join(sorted({m.state.kernel for m in lowered})) or "dense"
    print(f"{result.new_tokens} new tokens (greedy, static cache{', compiled' if result.compiled else ''}, "
          f"{device} / {args.dtype}, {len(lowered)} sparse layers: {kernels}): prefill "
          f"{result.prefill_tokens_per_s:.1f} tokens/s, decode {result.decode_tokens_per_s:.1f} tokens/s")
    return 0


# ----------------------------------------------------------------------------------------- prune

def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from .memory_plan import BATCH_HEADROOM, GIB, choose, fitting_batch, format_plan, model_shape, plan_modes

    if args.gpu_memory_gib is not None:
        gpu_bytes = int(args.gpu_memory_gib * GIB)
    elif torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_bytes = 80 * GIB
    shape = model_shape(args.model)
    autocast = args.autocast == "bf16"
    plans = plan_modes(shape, args.gpus, args.batch_size, args.seqlen, autocast=autocast)
    print(f"{args.model}: {args.gpus} GPU(s), {args.batch_size} x {args.seqlen} tokens per GPU")
    fits = {m: fitting_batch(shape, args.gpus, args.seqlen, gpu_bytes, m, autocast=autocast) for m in plans}
    fitting = (f"largest batch per GPU in {BATCH_HEADROOM:.0%} of it (--batch-size auto): "
               + ", ".join(f"{m} {b or 'none'}" for m, b in fits.items()))
    try:
        chosen = choose(plans, gpu_bytes)
    except ValueError as exc:
        print(format_plan(plans, None, gpu_bytes))
        print(fitting)
        raise UsageError(str(exc)) from exc
    print(format_plan(plans, chosen, gpu_bytes))
    print(fitting)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from .pipeline import SparsifyConfig
    from .recipe import render_recipe

    if args.out:
        check_output_file(args.out, "--out")
    text = render_recipe(SparsifyConfig(method=args.method))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


# ---------------------------------------------------------------------------------------- report

def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from .errors import CaptureError
    from .models import load_model
    from .report import inspect

    if args.json:
        check_output_file(args.json, "--json")
    loaded = load_model(args.model, device=pick_device(args.device), dtype=args.dtype)
    kernel = None if args.kernel == "none" else args.kernel
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.target_dtype]
    try:
        report = inspect(loaded.model, pattern=args.pattern, exclude=tuple(args.exclude), dtype=target,
                         kernel_constraints=kernel)
    except CaptureError as exc:
        raise UsageError(str(exc)) from exc
    print(report)
    if args.json:
        write_json(args.json, {"model": args.model, **report.as_dict()})
    if args.graph:
        print("graph written to " + ", ".join(str(p) for p in report.write_graph(args.graph)))
    return 0


# ----------------------------------------------------------------------------------- the parser

def build_parser() -> argparse.ArgumentParser:
    from .anneal.config import flat_fields
    from .pipeline import METHODS
    from .recipe import setting_docs, top_fields

    parser = argparse.ArgumentParser(prog="sparseforge-compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=SMOLLM2_NAME,
                       help=f"'{SMOLLM2_NAME}' (default), tiny-llama|tiny-qwen2|tiny-gpt2|tiny-opt|tiny-bert, "
                            f"a local HF folder, a sparse checkpoint folder, a .gguf file or a hub id")
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
        p.add_argument("--data-dir", default=None, help="data folder (default $SPARSEFORGE_DATA or ../shared/data)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="WikiText-2 perplexity by the standard protocol")
    common(p)
    p.add_argument("--tasks", default="wikitext2", metavar="T1,T2",
                   help="wikitext2 (perplexity by the SparseGPT protocol) and/or lm-eval tasks, e.g. piqa,arc_easy "
                        "(PIQA and ARC-Easy read the data folder; others need a datasets cache or hub access)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each lm-eval task")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a subset)")
    p.add_argument("--batch-size", type=int, default=1)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy text generation and its speed (sparse checkpoints lowered)")
    p.add_argument("--model", default=SMOLLM2_NAME, help="a sparse checkpoint folder, or any --model of eval")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the decode step (auto: on CUDA, with CUDA graphs; off on the CPU)")
    p.add_argument("--layout", default=None, choices=["cusparselt", "compact", "both", "fp8"],
                   help="what a sparse checkpoint's layers store and run (DispatchConfig.layout; default cusparselt)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("prune", help="prune a model to N:M (or unstructured) sparsity and save it",
                       description="Common settings are flags; every other one comes from --recipe FILE "
                                   "(sparseforge-compile recipe prints the defaults). Flags override the recipe.")
    docs = {k: v.replace("%", "%%") for k, v in setting_docs().items()}  # argparse formats help with %
    p.add_argument("--model", default=SMOLLM2_NAME)
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="recipe file (TOML, or YAML where PyYAML is installed): any setting, laid out as "
                        "'sparseforge-compile recipe' prints them")
    p.add_argument("--method", default=None, choices=METHODS, help=docs["method"] + " Default: sparseforge.")
    p.add_argument("--pattern", default=None, help="N:M (default 2:4), or 'none' for unstructured (with --sparsity)")
    p.add_argument("--sparsity", type=float, default=None, help=docs["sparsity"])
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB", help=docs["exclude"])
    p.add_argument("--budget-minutes", type=float, default=None, help="wall budget of the whole prune (minutes)")
    p.add_argument("--out", required=True, help="output folder (model, metrics, report, curves)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a sparse checkpoint already in --out")
    p.add_argument("--keep-training-state", action="store_true",
                   help="keep the optimizer state and teacher samples after the run finishes (for inspection)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eval-windows", type=int, default=4,
                   help="WikiText-2 test windows scored before and after (0: none, -1: all 148)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--calib-data", default=None, metavar="FILE[,FILE|c4]",
                   help=docs["calib_data"] + " Comma-separated.")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks scored on the pruned model (e.g. piqa,arc_easy; needs the [eval] extra)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel over N processes per node (GPUs; gloo processes on the CPU): reruns "
                        "this command under torchrun. --batch-size is per process")
    p.add_argument("--nnodes", default=None, help="with --nproc: torchrun's --nnodes (e.g. 2, or 1:4)")
    p.add_argument("--node-rank", type=int, default=None, help="with --nproc: this node's rank")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nproc on several nodes: the rendezvous host:port (torchrun's c10d rendezvous)")
    kinds = {**{n: f.type for n, f in top_fields().items()}, **{n: f.type for n, f in flat_fields().items()}}
    for name in PRUNE_FLAGS[4:]:  # method, pattern, sparsity and exclude have their own above
        kind = str(kinds[name])
        conv = (_int_or_word if "str" in kind else int) if ("int" in kind and "float" not in kind) \
            else float if "float" in kind else str
        p.add_argument(_flag(name), dest=name, type=conv, default=None, help=docs[name])
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plan", help="GPU memory per part for annealing a model under DDP and FSDP2, and the mode")
    p.add_argument("--model", default=SMOLLM2_NAME,
                   help="any --model of prune (Hugging Face models and shaped models read on the meta device), e.g. "
                        "llama-7b-shape or llama-7b-shape:8 (8 of its blocks)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=GPU_DEFAULTS["batch_size"], help="sequences per GPU")
    p.add_argument("--seqlen", type=int, default=GPU_DEFAULTS["seqlen"])
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of one GPU (default: this machine's first GPU, else 80)")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "off"], help="the loop's precision")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("recipe", help="print the default settings of a method as a recipe file for prune --recipe")
    p.add_argument("--method", default="sparseforge", choices=METHODS)
    p.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead of printing it")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("report", help="per-layer N:M eligibility, mask state, density and estimated savings")
    p.add_argument("--model", default=SMOLLM2_NAME, help="any --model of eval (a pruned checkpoint shows density)")
    p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="module names to keep dense (fnmatch, or re:REGEX)")
    p.add_argument("--kernel", default="cusparselt", choices=["cusparselt", "cutlass", "none"],
                   help="sparse-kernel shape rule to apply (none: only N:M divisibility)")
    p.add_argument("--target-dtype", default="bf16", choices=["bf16", "fp16"], help="dtype the sparse kernel runs in")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype to load the model in")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--graph", default=None, metavar="PATH", help="write the graph: .dot, .svg or .png")
    p.set_defaults(func=cmd_report)
    return parser


def _int_or_word(value: str) -> int | str:
    """A flag that takes a number or a word (``--batch-size auto``); the config checks which words."""
    return int(value) if value.lstrip("-").isdigit() else value


class _StderrHandler(logging.StreamHandler):
    """Logs to the ``sys.stderr`` of the moment: a caller that swaps it (a test's capture, a notebook) must
    not leave the logger writing to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s", handlers=[_StderrHandler()])
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"sparseforge-compile {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
