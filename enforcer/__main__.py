import sys

if sys.argv[1:2] == ["run"]:  # before the imports: see runtime/early_signals.py
    from enforcer.runtime.early_signals import hold

    hold()

from enforcer.cli.main import main

raise SystemExit(main())
