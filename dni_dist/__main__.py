import sys

from dni_dist.cli import main

sys.exit(main())
