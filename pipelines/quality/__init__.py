"""Data quality: great-expectations suites over the ClickHouse audit and the CQL tables
(docs/quality.md).

``sources`` reads the audit's fixed datasets and a CQL sample, ``checks`` builds the frames and
runs the suites (it imports great-expectations, so the CLI imports it only when checks run),
``cli`` is ``imstream quality``.
"""

from __future__ import annotations

from pipelines.quality.cli import quality_app

__all__ = ["quality_app"]
