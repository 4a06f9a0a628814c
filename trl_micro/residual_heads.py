"""Deprecated: moved to `trl_micro.personalization.residual_heads` (Stage 2 is one package). Removed in the next release."""

from .deprecation import alias_moved_module

alias_moved_module(__name__, "trl_micro.personalization.residual_heads")
