"""One model: a row per successful write request, keyed by the request's unique key."""

from __future__ import annotations

from django.db import models  # type: ignore[import-untyped]


class Item(models.Model):  # type: ignore[misc]
    """A written key (unique: a write that ran twice would fail on it)."""

    key = models.CharField(max_length=64, unique=True)

    class Meta:
        app_label = "shop"
