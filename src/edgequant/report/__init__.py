"""Reports from a compare's results store: tables, plots, Markdown/HTML, recommendations.

    from edgequant.report import render_report
    render_report("out/compare")      # out/compare/report.md, report.html, plots/*.png
"""

from .render import render_report

__all__ = ["render_report"]
