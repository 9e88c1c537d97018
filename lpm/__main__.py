import sys

from lpm.cli import main

sys.exit(main())
