import sys

from turbokit.cli import main

sys.exit(main())
