"""Model sources that need the optional nnunet extra say how to install it when it is missing."""

from __future__ import annotations

import sys

import pytest

from engine.errors import ModelError
from engine.models import ModelSpec, load_model


@pytest.mark.parametrize("kind", ["nnunet", "totalsegmentator"])
def test_a_missing_nnunet_extra_is_one_line_that_says_how_to_install_it(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)
    spec = ModelSpec(kind=kind, path=str(tmp_path), task="total_fast" if kind == "totalsegmentator" else None)
    with pytest.raises(ModelError, match=r"not installed.*pip install -c constraints.txt '\.\[nnunet\]'") as err:
        load_model(spec)
    assert "\n" not in str(err.value)


def test_nnunet_settings_on_another_kind_are_refused():
    from engine.errors import JobSpecError

    with pytest.raises(JobSpecError, match="mirroring, task apply to kind 'nnunet' or 'totalsegmentator'"):
        ModelSpec(kind="network", name="UNet", mirroring=True, task="total_fast")
    with pytest.raises(JobSpecError, match="ignore_bundle_preprocessing applies to kind 'bundle'"):
        ModelSpec(kind="torchscript", path="m.ts", ignore_bundle_preprocessing=True)
