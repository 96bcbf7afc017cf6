"""How good is what freshrec serves: ``prequential`` (test-then-train on the stream), ``replay``
and ``replay_scoring`` (the served list scored against what users did next), ``offline`` (the
transformer on a held-out split), ``ips`` (off-policy evaluation from the decision log) and
``simulator`` (a closed loop with simulated users)."""
