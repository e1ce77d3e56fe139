"""``python -m tgi_nb`` runs the ``tgi-nb`` command."""

import sys

from .cli import main

sys.exit(main())
