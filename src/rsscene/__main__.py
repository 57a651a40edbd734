import sys

from rsscene.cli import main

sys.exit(main())
