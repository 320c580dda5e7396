"""The scripts behind every published figure; run each as ``python -m benchmarks.<name>`` from the repository root."""
