"""enforcer's benchmark harness: ``python -m benchmarks`` (see ``benchmarks.cli``)."""
