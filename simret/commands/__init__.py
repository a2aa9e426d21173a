"""One module per ``simret`` sub-command. Modules here import click only; heavy imports go inside the
command functions so that ``simret --help`` stays instant."""
