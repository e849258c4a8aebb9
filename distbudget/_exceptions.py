"""The exceptions, under the name older modules import them by: they live in ``_core/errors.py``
(the pure core's validation raises them), where the tree is drawn."""

from distbudget._core.errors import *  # noqa: F403
