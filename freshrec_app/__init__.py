"""The application: ``cli`` (the ``freshrec`` command), ``embedded`` (``freshrec run``: every role in
one process), ``report`` (``freshrec report``) and ``grafana`` (the provisioned dashboard). Nothing
imports this package; it imports whatever it needs."""
