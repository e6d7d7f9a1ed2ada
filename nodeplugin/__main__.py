"""`pcipt-nodeplugin run|discover|simulate-host` (also `python -m nodeplugin`)."""

from nodeplugin.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
