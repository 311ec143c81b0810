"""A minimal Django project (settings, urls, one app with one model) for the Django tests.

Django's settings are process-global, so every scenario runs this project in its own
subprocess (:mod:`.serve`), configured by the ``PGF_DJANGO`` environment variable.
"""
