import sys

from fluid_train.cli import main

sys.exit(main())
