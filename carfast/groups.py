"""``carfast.groups``: the public face of ``carfast.graph.groups``."""
from carfast.graph.groups import CouplingGroup, GroupMember, find_group, members_of

__all__ = ["GroupMember", "CouplingGroup", "find_group", "members_of"]
