"""`python scripts/run.py experiment=table1 [overrides]` from a checkout: the `m2ib-bench` command
(m2ib/cli.py; configs in conf/, see README)."""
from m2ib.cli import main

if __name__ == "__main__":
    main()
