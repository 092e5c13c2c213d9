import sys

from runner_daemon.cli import main

sys.exit(main())
