"""Model versions and their delta publishing, serving replicas, retrieval with exploration, the
HTTP API, off-policy evaluation and the closed-loop simulator."""
