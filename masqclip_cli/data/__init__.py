"""Datasets: evaluation readers (:mod:`.datasets`) and the synthetic shapes world (:mod:`.synthetic`)."""
