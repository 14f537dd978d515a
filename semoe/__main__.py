"""`python -m semoe` is the `semoe` command."""

from semoe.cli import entry

entry()
