import sys

from d3tune.cli import main

sys.exit(main())
