"""``python -m distbudget.cli``."""

from distbudget.cli.main import main

raise SystemExit(main())
