"""`bnexp report`: results on disk -> pandas -> tables, figures and report.md / report.html.

Modules, in data-flow order: load (run directories -> DataFrames, --where), measures (measures.csv
and its seed means), aggregate (outcomes, seed groups, BN vs no-BN pairs), compare (reference
numbers), figures and fig_measures (drawing), figure_plan (which figures, drawn in parallel), render
(Markdown / HTML), build (write_report, the whole pipeline). The file names and columns it reads
are bnexp.layout's.
"""
from bnexp.report.build import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
