"""The report of a pruning run: ``write_report`` (``page``) with its figures (``figures``,
``filter_images``) and HTML (``html_page``)."""
from carfast.report.page import history_curves, write_report

__all__ = ["write_report", "history_curves"]
