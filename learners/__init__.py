"""Incremental model heads (river: ``mf``, ``ctr``) and the sequential transformer (torch:
``sasrec``), with its item map, training, offline evaluation and scheduled fine-tuning."""
