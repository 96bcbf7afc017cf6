"""Model delta publishing, serving replicas and the HTTP API.

Empty until the transformer/deltas issue and the serving issue land; the package exists now so that
the layout of the design card holds from the first commit.
"""
