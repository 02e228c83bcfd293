"""`python -m hybrid_erofs` runs the command line."""

from hybrid_erofs.cli import main

main()
