"""Recommendations over the published model and the stream's state: ``recommender`` (candidates,
fused ranking, exploration with known propensities), ``retrieval`` (the confident index and its
uncertainty), ``scan`` (exact top-n), ``fusion`` (the learned ranking), ``api`` (the HTTP contract),
``server`` (processes, replicas, readiness), ``dealer`` (connections dealt to workers) and
``dashboard`` (the built-in page)."""
