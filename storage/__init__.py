"""Durable state for PrefLoop: SQLite votes, exports, Hub sync. Imports nothing else of ours."""
