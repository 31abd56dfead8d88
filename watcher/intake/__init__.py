"""Intake: which files count, when a file is finished, the catch-up scan (watch, settle, scan)."""
