import os
import sys

# The stop signals are taken over before anything else (importing torch takes seconds): a
# signal during start-up is one line and its exit code, never a traceback (faults.py).
from runtime.train.faults import StartupStopped, StopSignal, startup_exit

stop = StopSignal().install(starting=True)
try:
    from runtime.train.trainer import main
except StartupStopped as e:  # the config is not read yet: not requeued
    code = startup_exit(e.signum, can_resume=False)
else:
    code = main(stop=stop)
if "RANK" in os.environ:
    # A launched rank (main() already passed its barrier and destroyed the process group):
    # leave without interpreter teardown, where gloo's background threads can abort a rank
    # (SIGABRT, "terminate called without an active exception") after a clean stop, which the
    # launcher would report as a crashed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
