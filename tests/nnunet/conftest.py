import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is an optional extra: pip install -c constraints.txt '.[nnunet]'")
