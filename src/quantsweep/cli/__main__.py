"""python -m quantsweep.cli"""

import sys

from . import main

sys.exit(main())
