"""``python -m benchmarks [--quick] [--only ...] [--workloads ...] [--out DIR]``."""

from benchmarks.cli import main

raise SystemExit(main())
