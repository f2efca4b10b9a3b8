import os
import sys

from runtime.train.trainer import main

code = main()
if "RANK" in os.environ:
    # A launched rank (main() already passed its barrier and destroyed the process group):
    # leave without interpreter teardown, where gloo's background threads can abort a rank
    # (SIGABRT, "terminate called without an active exception") after a clean stop, which the
    # launcher would report as a crashed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
