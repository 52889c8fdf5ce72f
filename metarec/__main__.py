"""``python -m metarec``."""

from metarec.cli import main

main()
