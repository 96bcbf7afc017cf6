"""Incremental model heads (river) and the sequential transformer (torch).

Empty until the counters-and-heads issue and the transformer issue land; the package exists now so
that the layout of the design card holds from the first commit.
"""
