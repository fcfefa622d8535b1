import sys

from siajax.cli import main

sys.exit(main())
