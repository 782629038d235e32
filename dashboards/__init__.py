"""Versioned dashboard definitions (SQL per panel + layout)."""
