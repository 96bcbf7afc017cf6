"""Model versions and how they travel: ``updates`` (the sparse/dense delta format), ``chain`` (the
versions' commit point in Kafka), ``publisher`` (training → topics, snapshot store, ``model_updates``),
``snapshots`` (the local store of full versions) and ``replica`` (a serving process's copy, applied
atomically)."""
