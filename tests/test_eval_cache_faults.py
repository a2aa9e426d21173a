"""The ``simret eval`` descriptor cache: images replaced in place are described again; one writer at a time."""
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from simret.cli import cli
from simret.models import create_encoder
from simret.retrieval.evaluation import EvalSettings, evaluate_encoder
from simret.retrieval.store import StoreReader
from simret.utils.locking import writer_lock


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from simret.data.samples import write_revisited_sample

    root = tmp_path_factory.mktemp("revisited")
    write_revisited_sample(root, landmarks=["chelsea", "rocket"], image_size=64)
    return root


@pytest.fixture
def data(sample, tmp_path):
    shutil.copytree(sample, tmp_path / "data")
    return tmp_path / "data"


def cached_rows(cache):
    """``{file name: (descriptor, recorded size)}`` of the cached database descriptors."""
    store_path = next((cache / "rsample").glob("*/index/descriptors.h5"))
    with StoreReader(store_path) as store:
        rows, sizes = store.rows(range(store.count)), store.file_states().sizes
        return {os.path.basename(i): (rows[n], int(sizes[n])) for n, i in enumerate(store.ids)}


def test_a_database_image_replaced_in_place_is_described_again(data, tmp_path):
    encoder = create_encoder("test_resnet", weights=None)
    settings = EvalSettings(max_size=64, workers=0, cache_dir=tmp_path / "cache")
    evaluate_encoder(encoder, data, "rsample", settings)
    before = cached_rows(tmp_path / "cache")
    images = data / "rsample" / "jpg"
    target, source = sorted(images.glob("chelsea_easy_*.jpg"))[:2]
    assert not np.allclose(before[target.name][0], before[source.name][0])
    stamp = target.stat().st_mtime_ns
    target.write_bytes(source.read_bytes())  # the same path, other bytes
    os.utime(target, ns=(stamp + 10**9, stamp + 10**9))
    evaluate_encoder(encoder, data, "rsample", settings)
    after = cached_rows(tmp_path / "cache")
    np.testing.assert_allclose(after[target.name][0], before[source.name][0], atol=1e-6)  # the new bytes' descriptor
    assert after[target.name][1] == source.stat().st_size
    others = [name for name in before if name != target.name]
    assert all(np.array_equal(after[name][0], before[name][0]) for name in others)


def test_eval_takes_the_cache_lock_with_a_timeout(data, tmp_path):
    args = ["eval", "rsample", "--data-root", str(data), "--model", "test_resnet", "--weights", "none", "--max-size",
            "64", "-j", "0", "--cache", str(tmp_path / "cache")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    index = next((tmp_path / "cache" / "rsample").glob("*/index"))
    with writer_lock(index):  # another eval describes into the same cache
        result = CliRunner().invoke(cli, [*args, "--lock-timeout", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(index) in errors[0] and "still after 0 s" in errors[0]
