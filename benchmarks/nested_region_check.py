"""Does Inductor differentiate through ``torch.compiler.nested_compile_region`` correctly here?

No SparseForge code: three calls of one region, each fed a weight computed inside the compiled
function, gradients against eager. torch 2.13 on the CPU: the first call's weight gets a wrong
gradient under Inductor (aot_eager is right) unless Inductor's buffer reuse is off, which is how the
training loop compiles an outlined graph (``--outline-blocks``). Exit status 1 if that configuration
is wrong here.

    python -m benchmarks.nested_region_check            # CPU, and the GPU if there is one
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def relative_errors(device: str, backend: str, options: dict | None = None) -> list[float]:
    torch.manual_seed(0)

    @torch.compiler.nested_compile_region
    def block(x, w):
        return x + F.linear(torch.tanh(x), w)

    weights = [(0.1 * torch.randn(8, 8, device=device)).requires_grad_() for _ in range(3)]

    def f(x):
        for w in weights:
            x = block(x, w * 1.0)  # the region's input is computed inside the compiled function
        return x

    x = torch.randn(4, 8, device=device)

    def grads(fn):
        fn(x).square().mean().backward()
        out = [w.grad.clone() for w in weights]
        for w in weights:
            w.grad = None
        return out

    ref = grads(f)
    got = grads(torch.compile(f, backend=backend, dynamic=False, options=options))
    return [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]


def main() -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wrong = False
    for device in devices:
        for backend, options in (("aot_eager", None), ("inductor", None),
                                 ("inductor", {"allow_buffer_reuse": False})):
            errs = relative_errors(device, backend, options)
            ok = max(errs) < 1e-4
            used = options is not None  # the configuration the training loop compiles with
            wrong |= used and not ok
            print(f"torch {torch.__version__} {device:4s} {backend:9s} {str(options or ''):30s} relative gradient "
                  f"errors {', '.join(f'{e:.2e}' for e in errs)}: {'ok' if ok else 'WRONG'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
