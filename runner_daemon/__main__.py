import sys

from runner_daemon.service.cli import main

sys.exit(main())
