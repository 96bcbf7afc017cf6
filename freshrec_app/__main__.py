"""``python -m freshrec_app`` runs the command line, exactly as the ``freshrec`` console script does."""

from freshrec_app.cli import main

main()
