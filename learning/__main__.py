"""``python -m learning``."""

from learning.cli import app

app(prog_name="python -m learning")
