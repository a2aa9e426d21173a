"""``python -m simret`` is the ``simret`` command."""
from simret.cli import main

if __name__ == "__main__":
    main()
