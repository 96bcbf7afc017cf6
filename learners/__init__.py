"""Incremental model heads (river: ``mf``, ``ctr``; built by name in ``heads``) and the sequential
transformer (torch: ``sasrec``), with its item map, sequences, training and scheduled fine-tuning."""
