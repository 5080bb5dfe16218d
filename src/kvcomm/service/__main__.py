"""``python -m kvcomm.service serve|agent|topology …``."""

from kvcomm.service.cli import main

main()
