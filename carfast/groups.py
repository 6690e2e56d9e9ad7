"""Deprecated: ``carfast.groups`` is ``carfast.graph`` (``find_group``, ``CouplingGroup``, ``GroupMember``,
``members_of``); importing it warns."""
import warnings

from carfast.graph import CouplingGroup, GroupMember, find_group, members_of

__all__ = ["GroupMember", "CouplingGroup", "find_group", "members_of"]

warnings.warn("carfast.groups is deprecated and will be removed: import find_group, CouplingGroup, GroupMember and "
              "members_of from carfast.graph", DeprecationWarning, stacklevel=2)
