"""``python -m celery_warden``."""

import sys

from celery_warden.commands import main

sys.exit(main())
