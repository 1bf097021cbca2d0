"`python -m cytoclr` is the `cytoclr` command."
import sys

from cytoclr.cli import main

sys.exit(main())
