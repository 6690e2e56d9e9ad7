"""Seeded synthetic networks for the tests: ``basic`` (one target layer each, consumers written by hand)
and ``families`` (the architecture families of the model zoos, with hand-written removals)."""
from .basic import NETS, SCORABLE, NetCase, make_alexnet_head, make_data, make_inputs, own_labels, prune_step, randomize
from .families import FAMILIES, Family, Removal, Target
from .mobilenet import MobileNetV2SE, make_mobilenet  # noqa: F401 (the MobileNetV2-style net, exported)

__all__ = ["NETS", "SCORABLE", "NetCase", "make_alexnet_head", "make_data", "make_inputs", "own_labels", "randomize",
           "prune_step",
           "FAMILIES", "Family", "Removal", "Target"]
