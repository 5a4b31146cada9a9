"""Helpers below every stage: atomic writes and hashes (``io``), the command wrapper (``cli``),
devices."""
