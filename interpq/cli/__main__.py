import sys

from interpq.cli.main import main

sys.exit(main())
