"""No split, dataset or list file makes simret read a file outside its root: '..', absolute paths and
symbolic links leading outside are refused, naming the row; a root that is itself a link is fine."""
import os
import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from simret.cli import cli
from simret.data.images import Failed, ImageList, list_images
from simret.data.paths import OutsideRootError, RootGuard, check_relative
from simret.data.revisited import GroundTruthError, load_distractors, load_revisited
from simret.data.splits import load_split


def picture(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def secret(tmp_path):
    """An image outside every root of the test."""
    return picture(tmp_path / "private" / "secret.jpg", 7)


# ------------------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize("entry", ["../x.jpg", "a/../../x.jpg", "..", "/etc/passwd", "\\\\server\\x.jpg",
                                   "C:x.jpg", "a\\..\\..\\x.jpg", "a\x00.jpg"])
def test_check_relative_refuses(entry):
    with pytest.raises(OutsideRootError, match="list.txt:3"):
        check_relative(entry, "list.txt:3", "ROOT")


@pytest.mark.parametrize("entry", ["x.jpg", "a/b/x.jpg", "a..b.jpg", "..x.jpg", "./x.jpg", "~/x.jpg"])
def test_check_relative_accepts(entry):
    assert check_relative(entry, "list.txt:3", "ROOT") == entry


def test_root_guard(tmp_path, secret):
    root = tmp_path / "root"
    picture(root / "in.jpg")
    (root / "sub").mkdir()
    os.symlink(root / "in.jpg", root / "sub" / "inner.jpg")  # a link that stays inside
    os.symlink(secret, root / "sub" / "leak.jpg")
    os.symlink(secret.parent, root / "linked")  # a folder that leads outside
    guard = RootGuard(root)
    assert guard.outside("in.jpg") is None and guard.outside("sub/inner.jpg") is None
    assert guard.outside("missing.jpg") is None
    assert guard.outside("sub/leak.jpg") == str(secret.resolve())
    assert guard.outside("linked/secret.jpg") == str(secret.resolve())
    with pytest.raises(OutsideRootError, match=r"list:9: 'sub/leak\.jpg' leads outside"):
        guard.refuse("sub/leak.jpg", "list:9")


# ---------------------------------------------------------------------------------- few-shot splits


def csv_dataset(root, rows):
    for name in ("a.jpg", "b.jpg"):
        picture(root / "images" / name)
    (root / "test.csv").write_text("filename,label\n" + "".join(f"{f},{label}\n" for f, label in rows))
    return root


@pytest.mark.parametrize("row, line, message", [
    (("../../private/secret.jpg", "n1"), 3, "climbs out with '..'"),
    (("/etc/hostname", "n1"), 3, "absolute path"),
    (("secret.jpg", "../../private"), 3, "label: '../../private' climbs out"),
])
def test_csv_split_refuses_rows_leading_outside(tmp_path, secret, row, line, message):
    root = csv_dataset(tmp_path / "mini", [("a.jpg", "n0"), row, ("b.jpg", "n1")])
    with pytest.raises(OutsideRootError, match=rf"test\.csv:{line}: .*{message}"):
        load_split(root, "test")


def test_csv_split_refuses_a_link_leading_outside(tmp_path, secret):
    root = csv_dataset(tmp_path / "mini", [("a.jpg", "n0"), ("b.jpg", "n1"), ("leak.jpg", "n1")])
    os.symlink(secret, root / "images" / "leak.jpg")
    with pytest.raises(OutsideRootError, match=r"test\.csv:4: 'leak\.jpg' leads outside .*secret\.jpg"):
        load_split(root, "test")
    (root / "images" / "leak.jpg").unlink()
    os.symlink(root / "images" / "a.jpg", root / "images" / "leak.jpg")  # a link inside the folder is fine
    assert load_split(root, "test").ids == ["a.jpg", "b.jpg", "leak.jpg"]


def test_csv_split_whose_image_folder_is_a_link(tmp_path):
    real = csv_dataset(tmp_path / "disk" / "mini", [("a.jpg", "n0"), ("b.jpg", "n1")])
    (tmp_path / "data").mkdir()
    os.symlink(real, tmp_path / "data" / "mini")
    split = load_split(tmp_path / "data" / "mini", "test")
    assert split.ids == ["a.jpg", "b.jpg"] and split.root == (real / "images").resolve()


def folder_dataset(root):
    for label in ("cat", "dog"):
        for i in range(2):
            picture(root / "test" / label / f"{i}.jpg")
    return root


def test_folder_split_refuses_links_leading_outside(tmp_path, secret):
    root = folder_dataset(tmp_path / "fs")
    os.symlink(secret, root / "test" / "cat" / "leak.jpg")
    with pytest.raises(OutsideRootError, match=r"cat/leak\.jpg is a symbolic link to .*secret\.jpg"):
        load_split(root, "test")
    (root / "test" / "cat" / "leak.jpg").unlink()
    os.symlink(secret.parent, root / "test" / "private")  # a class folder that is elsewhere
    with pytest.raises(OutsideRootError, match=r"class folder .*test/private is a symbolic link"):
        load_split(root, "test")
    (root / "test" / "private").unlink()
    os.symlink(root / "test" / "dog" / "0.jpg", root / "test" / "cat" / "inner.jpg")  # stays inside: fine
    split = load_split(root, "test")
    assert "cat/inner.jpg" in split.ids and len(split) == 5


def test_folder_split_whose_root_is_a_link(tmp_path):
    real = folder_dataset(tmp_path / "disk" / "fs")
    os.symlink(real, tmp_path / "fs")
    assert len(load_split(tmp_path / "fs", "test")) == 4


# -------------------------------------------------------------------------------------- Revisited


def revisited(root, imlist=("a", "b"), qimlist=("q",)):
    folder = root / "rtest"
    for name in list(imlist) + list(qimlist):
        if ".." not in name and not name.startswith("/"):
            picture(folder / "jpg" / f"{name}.jpg")
    gnd = {"imlist": list(imlist), "qimlist": list(qimlist),
           "gnd": [{"easy": np.array([0]), "hard": np.array([], dtype=np.int64), "junk": np.array([], dtype=np.int64),
                    "bbx": [0.0, 0.0, 4.0, 4.0]} for _ in qimlist]}
    (folder / "gnd_rtest.pkl").write_bytes(pickle.dumps(gnd, protocol=2))
    return folder


@pytest.mark.parametrize("imlist, qimlist, where", [
    (("a", "../../private/secret"), ("q",), r"imlist\[1\]: '\.\./\.\./private/secret' climbs out"),
    (("a", "b"), ("/tmp/q",), r"qimlist\[0\] \(query 0\): '/tmp/q' is an absolute path"),
])
def test_ground_truth_names_must_stay_in_jpg(tmp_path, imlist, qimlist, where):
    revisited(tmp_path, imlist, qimlist)
    with pytest.raises(GroundTruthError, match=where) as caught:
        load_revisited(tmp_path, "rtest")
    assert "gnd_rtest.pkl" in str(caught.value)


def test_revisited_image_links_leading_outside(tmp_path, secret):
    folder = revisited(tmp_path, ("a", "b", "c"), ("q0", "q1"))
    (folder / "jpg" / "c.jpg").unlink()
    os.symlink(secret, folder / "jpg" / "c.jpg")
    with pytest.raises(OutsideRootError, match=r"gnd_rtest\.pkl: imlist\[2\]: 'c\.jpg' leads outside"):
        load_revisited(tmp_path, "rtest", check_images=False)
    (folder / "jpg" / "c.jpg").unlink()
    picture(folder / "jpg" / "c.jpg")
    (folder / "jpg" / "q1.jpg").unlink()
    os.symlink(secret, folder / "jpg" / "q1.jpg")
    with pytest.raises(OutsideRootError, match=r"qimlist\[1\] \(query 1\): 'q1\.jpg' leads outside"):
        load_revisited(tmp_path, "rtest")


def test_revisited_jpg_folder_may_be_a_link(tmp_path):
    folder = revisited(tmp_path / "disk")
    (tmp_path / "data" / "rtest").mkdir(parents=True)
    os.symlink(folder / "jpg", tmp_path / "data" / "rtest" / "jpg")
    (tmp_path / "data" / "rtest" / "gnd_rtest.pkl").write_bytes((folder / "gnd_rtest.pkl").read_bytes())
    assert load_revisited(tmp_path / "data", "rtest").n_images == 2


def test_distractor_list_rows(tmp_path, secret):
    folder = tmp_path / "revisitop1m"
    picture(folder / "jpg" / "0" / "a.jpg")
    listing = folder / "revisitop1m.txt"
    for text, message in (("0/a.jpg\n\n/etc/hostname\n", r"revisitop1m\.txt:3: '/etc/hostname' is an absolute"),
                          ("0/a.jpg\n0/../../x.jpg\n", r"revisitop1m\.txt:2: .* climbs out")):
        listing.write_text(text)
        with pytest.raises(OutsideRootError, match=message):
            load_distractors(tmp_path)
    os.symlink(secret, folder / "jpg" / "0" / "leak.jpg")
    os.symlink(secret.parent, folder / "jpg" / "1")
    listing.write_text("0/a.jpg\n1/secret.jpg\n")
    with pytest.raises(OutsideRootError, match=r"revisitop1m\.txt:2: '1/secret\.jpg' leads outside"):
        load_distractors(tmp_path)
    listing.write_text("0/a.jpg\n\n0/leak.jpg\n")
    with pytest.raises(OutsideRootError, match=r"revisitop1m\.txt:3: '0/leak\.jpg' leads outside"):
        load_distractors(tmp_path)  # checked even without check_images (one folder read, no stat per file)


# ------------------------------------------------------------------------- simret index / search input


def test_list_file_rules(tmp_path, secret):
    root = tmp_path / "photos"
    picture(root / "a.jpg")
    picture(root / "sub" / "b.jpg")
    listing = root / "list.txt"
    listing.write_text(f"a.jpg\nsub/../sub/b.jpg\n{secret}\n")  # '..' that stays inside, and an absolute path
    assert list_images(listing) == (root.resolve(), ["a.jpg", "sub/b.jpg", str(secret.resolve())])
    listing.write_text("a.jpg\n../private/secret.jpg\n")
    with pytest.raises(OutsideRootError, match=r"list\.txt:2: '\.\./private/secret\.jpg' .* climbs out of it"):
        list_images(listing)
    os.symlink(secret, root / "leak.jpg")
    listing.write_text("# a comment\na.jpg\nleak.jpg\n")
    with pytest.raises(OutsideRootError, match=r"list\.txt:3: 'leak\.jpg' .* symbolic link to .*secret\.jpg"):
        list_images(listing)


def test_folder_source_refuses_links_leading_outside(tmp_path, secret):
    root = tmp_path / "photos"
    picture(root / "a.jpg")
    os.symlink(root / "a.jpg", root / "inner.jpg")
    assert list_images(root)[1] == ["a.jpg", "inner.jpg"]
    os.symlink(secret, root / "leak.jpg")
    with pytest.raises(OutsideRootError, match=r"leak\.jpg is a symbolic link to .*secret\.jpg"):
        list_images(root)


def test_image_list_does_not_read_a_link_made_after_listing(tmp_path, secret):
    root = tmp_path / "photos"
    picture(root / "a.jpg")
    os.symlink(secret, root / "late.jpg")
    dataset = ImageList(root, ["a.jpg", "late.jpg", str(secret)], lambda image: image.size)
    assert dataset[0] == ((8, 8), 0)
    failed = dataset[1]
    assert isinstance(failed, Failed) and "leads outside" in failed.reason and failed.path == "late.jpg"
    assert dataset[2] == ((8, 8), 2)  # an absolute id is read where it points


def test_index_command_names_the_row(tmp_path, secret):
    root = tmp_path / "photos"
    picture(root / "a.jpg")
    (root / "list.txt").write_text("a.jpg\n../private/secret.jpg\n")
    result = CliRunner().invoke(cli, ["index", str(root / "list.txt"), "--out", str(tmp_path / "idx"),
                                      "--model", "test_resnet", "--weights", "none"])
    assert result.exit_code == 1
    assert "list.txt:2" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "idx").exists()
