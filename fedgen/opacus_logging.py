"""Opacus calls `logging.basicConfig()` when imported, which adds a root handler that
doubles every line Flower logs. Importing this module (right after a module's Opacus
imports) imports Opacus and takes that handler off again, recognised by Opacus's format."""

from __future__ import annotations

import logging

import opacus  # noqa: F401  (its import adds the handler removed below)

_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"

for _handler in list(logging.getLogger().handlers):
    if getattr(_handler.formatter, "_fmt", None) == _OPACUS_FORMAT:
        logging.getLogger().removeHandler(_handler)
