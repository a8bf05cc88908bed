from enforcer.cli.main import main

raise SystemExit(main())
