"""``python -m aslprep_lite`` runs the BIDS-App."""

import sys

from aslprep_lite.cli.run import main

sys.exit(main())
