"""`python -m zili ...` runs the CLI (as the `zili` script does)."""

from zili.cli import app

app()
