import sys

from llmpalette.cli import main

sys.exit(main())
