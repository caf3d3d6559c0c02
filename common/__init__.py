"""Helpers every package shares and that belong to none of them: files written atomically (atomic),
free TCP ports (ports), checked command-line argument types (arguments) and a Ray address that
answers (ray_address). It imports nothing of the project, so any package may import it."""
