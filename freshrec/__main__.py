"""``python -m freshrec`` runs the command line, exactly as the ``freshrec`` console script does."""

from freshrec.cli import main

main()
