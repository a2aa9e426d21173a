"""Few-shot splits on disk: miniImageNet CSV and folder-per-class layouts, and the errors for bad splits."""
import numpy as np
import pytest
from PIL import Image

from simret.data.samples import write_fewshot_sample
from simret.data.splits import available_splits, describe_split, detect_format, load_split


def _image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_fewshot_sample(root / "folders", per_class=6, image_size=8)
    write_fewshot_sample(root / "mini", layout="miniimagenet", per_class=6, image_size=8)
    return root


def test_folder_split_lists_classes_images_and_labels(digits):
    split = load_split(digits / "folders", "test")
    assert split.format == "folders" and split.name == "test"
    assert split.classes == [f"digit_{d}" for d in range(5, 10)]
    assert len(split) == 30 and split.labels.dtype == np.int64
    assert split.ids[:2] == ["digit_5/0000.png", "digit_5/0001.png"]
    for image_id, label in zip(split.ids, split.labels):
        assert image_id.split("/")[0] == split.classes[label]
        assert (split.root / image_id).is_file()
    assert split.class_counts() == {f"digit_{d}": 6 for d in range(5, 10)}
    assert describe_split(split) == "test split (folders): 5 classes, 30 images (6 per class)"


def test_csv_split_matches_folder_split(digits):
    mini = load_split(digits / "mini", "test")
    folders = load_split(digits / "folders", "test")
    assert mini.format == "miniimagenet" and mini.source.name == "test.csv"
    assert mini.root == (digits / "mini" / "images").resolve()
    assert mini.classes == folders.classes
    np.testing.assert_array_equal(np.bincount(mini.labels), np.bincount(folders.labels))
    for image_id, label in zip(mini.ids, mini.labels):
        assert image_id.startswith(mini.classes[label] + "_") and (mini.root / image_id).is_file()


def test_format_detection_and_available_splits(digits):
    assert detect_format(digits / "mini") == "miniimagenet"
    assert detect_format(digits / "folders") == "folders"
    assert available_splits(digits / "mini") == ["train", "test"]
    assert available_splits(digits / "folders", "folders") == ["train", "test"]
    with pytest.raises(FileNotFoundError, match="not a few-shot split"):
        detect_format(digits)
    with pytest.raises(FileNotFoundError, match="no such split folder"):
        detect_format(digits / "nope")
    with pytest.raises(ValueError, match="unknown split format"):
        load_split(digits / "mini", "test", format="parquet")


def test_csv_accepts_label_subfolders_and_any_column_order(tmp_path):
    _image(tmp_path / "images" / "n01" / "a.jpg")
    _image(tmp_path / "images" / "b.jpg")
    (tmp_path / "val.csv").write_text("label,filename\nn01,a.jpg\nn02,b.jpg\n\n")
    split = load_split(tmp_path, "val")
    assert split.ids == ["n01/a.jpg", "b.jpg"] and split.classes == ["n01", "n02"]
    assert split.labels.tolist() == [0, 1]


def test_missing_csv_is_named(digits):
    with pytest.raises(FileNotFoundError,
                       match=r"split 'val': no such CSV file .*val\.csv \(found: test\.csv, train\.csv\)"):
        load_split(digits / "mini", "val", format="miniimagenet")


def test_missing_split_folder_is_named(digits):
    with pytest.raises(FileNotFoundError, match=r"split 'val': no such folder .*found folders: test, train"):
        load_split(digits / "folders", "val", format="folders")


def test_missing_images_listed_by_the_csv_are_named(tmp_path):
    _image(tmp_path / "images" / "ok.jpg")
    (tmp_path / "test.csv").write_text("filename,label\nok.jpg,a\ngone.jpg,a\nlost.jpg,b\n")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 listed image\(s\) are missing .*gone\.jpg, lost\.jpg"):
        load_split(tmp_path, "test")


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("file,class\na.jpg,x\n", "must name 'filename' and 'label'"),
    ("filename,label\n", "lists no images"),
    ("filename,label\na.jpg\n", r"test\.csv:2: expected filename,label"),
])
def test_malformed_csv(tmp_path, text, message):
    _image(tmp_path / "images" / "a.jpg")
    (tmp_path / "test.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_split(tmp_path, "test")


def test_empty_class_folder_is_named(tmp_path):
    _image(tmp_path / "test" / "cat" / "1.png")
    (tmp_path / "test" / "dog").mkdir()
    (tmp_path / "test" / "dog" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no images: dog"):
        load_split(tmp_path, "test")


def test_split_folder_without_class_folders(tmp_path):
    _image(tmp_path / "test" / "loose.png")
    with pytest.raises(ValueError, match="has no class folders"):
        load_split(tmp_path, "test")


def test_images_in_class_subfolders_are_found(tmp_path):
    _image(tmp_path / "train" / "bird" / "a" / "1.png")
    _image(tmp_path / "train" / "bird" / "2.png")
    _image(tmp_path / "train" / ".hidden" / "3.png")
    split = load_split(tmp_path, "train")
    assert split.classes == ["bird"] and split.ids == ["bird/2.png", "bird/a/1.png"]


def test_class_size_check_names_small_classes_and_counts(tmp_path):
    for name, count in (("big", 5), ("small", 3), ("tiny", 1)):
        for i in range(count):
            _image(tmp_path / "test" / name / f"{i}.png")
    split = load_split(tmp_path, "test")
    split.check_class_sizes(1)
    with pytest.raises(ValueError, match=r"2 class\(es\) have fewer than 4 images \(shot 1 \+ query 3\): "
                                         r"small \(3 images\), tiny \(1 image\)"):
        split.check_class_sizes(4, "shot 1 + query 3")
    split.check_n_way(3)
    with pytest.raises(ValueError,
                       match="5-way episodes need 5 classes, but split 'test' .* has only 3: big, small, tiny"):
        split.check_n_way(5)


def test_csv_with_byte_order_mark_and_crlf_line_ends(tmp_path):
    # CSVs saved by spreadsheet tools on Windows start with a UTF-8 BOM and end lines with CRLF
    _image(tmp_path / "images" / "n0153282900000005.jpg")
    _image(tmp_path / "images" / "n0153282900000006.jpg")
    (tmp_path / "test.csv").write_bytes(b"\xef\xbb\xbffilename,label\r\nn0153282900000005.jpg,n01532829\r\n"
                                        b"n0153282900000006.jpg,n01532829\r\n")
    split = load_split(tmp_path, "test")
    assert split.format == "miniimagenet" and split.classes == ["n01532829"]
    assert split.ids == ["n0153282900000005.jpg", "n0153282900000006.jpg"] and split.labels.tolist() == [0, 0]
