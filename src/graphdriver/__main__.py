"""``python3 -m graphdriver``: the same command as the ``graphdriver`` script."""

from graphdriver.cli.main import main

raise SystemExit(main())
