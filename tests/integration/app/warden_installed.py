"""The test app with one line added: ``celery_warden.install(app)``."""

from __future__ import annotations

from warden_testapp import app

import celery_warden

__all__ = ["app"]

celery_warden.install(app)
