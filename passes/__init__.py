"""Graph passes: each one a function or class over a GraphModule with one job (installed as
``sparseforge_compile.passes``). No training and no I/O in here."""
