"""Class tables and names files."""

from __future__ import annotations

import json

import pytest

from engine import io, models
from engine.errors import JobSpecError, ModelError
from engine.labels import THORAX_CLASSES, read_names_file, resolve_class_names, totalsegmentator_to_thorax


def test_names_files_list_and_object(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(["background", "aorta"]))
    (tmp_path / "o.json").write_text(json.dumps({"0": "background", "1": "aorta", "5": "heart"}))
    assert read_names_file(tmp_path / "l.json") == {0: "background", 1: "aorta"}
    assert read_names_file(tmp_path / "o.json") == {0: "background", 1: "aorta", 5: "heart"}
    assert io.read_label_names(tmp_path / "o.json")[5] == "heart"
    assert models.read_class_names(tmp_path / "l.json") == ("background", "aorta")
    with pytest.raises(ModelError, match="without gaps"):
        models.read_class_names(tmp_path / "o.json")  # class ids must cover 0..N-1


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"), ("{not json", "not valid JSON"), ('{"a": "x"}', "integer ids"), ("3", "list or object"),
])
def test_bad_names_files(tmp_path, content, expected):
    path = tmp_path / "names.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(JobSpecError, match=expected):
        io.read_label_names(path)
    with pytest.raises(ModelError, match=expected):
        models.read_class_names(path)


def test_class_names_must_match_channels():
    assert resolve_class_names(3) == ("0", "1", "2")
    with pytest.raises(ValueError, match="3 channels but 2"):
        resolve_class_names(3, ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        resolve_class_names(2, ["a", "a"])


def test_totalsegmentator_mapping_joins_ribs_and_vertebrae():
    ts = {10: "lung_upper_lobe_left", 92: "rib_left_1", 104: "rib_right_1", 32: "vertebrae_T12", 5: "liver",
          116: "sternum", 86: "autochthon_left"}
    mapped = totalsegmentator_to_thorax(ts)
    assert mapped == {10: "lung_upper_lobe_left", 92: "ribs", 104: "ribs", 32: "vertebrae", 116: "sternum",
                      86: "autochthon_left"}
    assert set(mapped.values()) <= set(THORAX_CLASSES)
