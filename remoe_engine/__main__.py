import sys

from remoe_engine.cli import main

sys.exit(main())
