import sys

from runner_daemon.entry import main

sys.exit(main())
