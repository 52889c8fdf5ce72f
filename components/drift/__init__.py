"""Drift monitoring: statistics (:mod:`.stats`), checks of a feedback window (:mod:`.monitor`), report.

See ``docs/drift.md`` for what each check measures and why its threshold is what it is.
"""
