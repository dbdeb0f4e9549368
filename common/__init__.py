"""Helpers every side of lesionfuse shares: the base error, atomic files, hashes, the version."""
