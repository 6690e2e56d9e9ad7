"""``carfast.groups``: the public face of ``carfast.graph.groups``."""
from carfast.graph.groups import GroupMember, CouplingGroup, find_group, members_of

__all__ = ["GroupMember", "CouplingGroup", "find_group", "members_of"]
