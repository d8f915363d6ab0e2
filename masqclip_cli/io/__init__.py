"""Inputs (sources) and outputs (writers)."""
