"""Helpers every package shares and that belong to none of them: files written atomically (atomic)
and free TCP ports (ports). It imports nothing of the project, so any package may import it."""
