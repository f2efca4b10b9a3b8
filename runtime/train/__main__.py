import sys

from runtime.train.trainer import main

sys.exit(main())
