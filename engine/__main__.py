"""``python -m engine`` is the ``mrfm`` command."""

from .cli import cli

cli(prog_name="mrfm")
