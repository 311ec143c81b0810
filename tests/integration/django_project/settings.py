"""Settings of the test project, from the JSON in ``PGF_DJANGO``: ``databases`` (Django's
``DATABASES``), optional ``installed_apps`` (the ``shop`` app is always installed)."""

from __future__ import annotations

import json
import os
from typing import Any

_CONFIG: dict[str, Any] = json.loads(os.environ.get("PGF_DJANGO", "{}"))

SECRET_KEY = "pgfailover-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.integration.django_project.urls"
MIDDLEWARE: list[str] = []
INSTALLED_APPS = [*_CONFIG.get("installed_apps", []), "tests.integration.django_project.shop"]
DATABASES: dict[str, Any] = _CONFIG.get("databases", {})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # the failing requests are the point of the tests: keep their tracebacks off stderr
    "loggers": {"django.request": {"level": "CRITICAL"}},
}
