import sys

from petald.cli import main

sys.exit(main())
