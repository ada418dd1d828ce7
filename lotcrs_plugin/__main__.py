import sys

from lotcrs_plugin.cli import main

sys.exit(main())
