"""``run(*args)``: the ``simret`` command in this process (click's runner), random-weight warnings silenced
(module-scoped fixtures run outside conftest's filter); with ``ok=True`` a non-zero exit fails the test."""
import warnings

from click.testing import CliRunner

from simret.cli import cli
from simret.models import RandomWeightsWarning


def run(*args, ok=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result
