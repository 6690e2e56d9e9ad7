"""Physical removal: ``remove_filters`` / ``remove_groups`` (``remove``, one slicer per layer type in
``slicers``), saving and loading pruned networks (``pruned_io``), their size and speed (``measure``)."""
from carfast.surgery.measure import ModelStats, count_macs, count_params, latency
from carfast.surgery.pruned_io import load_pruned_model, save_pruned
from carfast.surgery.remove import remove_filters, remove_groups
from carfast.surgery.slicers import cut_tensor

__all__ = ["remove_filters", "remove_groups", "save_pruned", "load_pruned_model", "ModelStats", "count_params",
           "count_macs", "latency", "cut_tensor"]
