"""The cell store shared by ``gradot pipeline`` and ``bench/transfer.py``: resume, report-only,
atomic writes, and the folder's settings record."""

import json

import pytest

from gradot.cells import SETTINGS_FILE, CellStore, claim_folder
from gradot.errors import CellSettingsError, PipelineSettingsError


def test_a_cell_is_computed_once_then_read_back(tmp_path):
    calls, stages = [], []
    store = CellStore(tmp_path / "cells", stamp=lambda: {"git_commit": "abc"})

    def compute():
        calls.append(1)
        return {"acc": 0.5}

    first = store.cell("full_zs-piqa", compute, on_stage=stages.append)
    again = CellStore(tmp_path / "cells").cell("full_zs-piqa", compute, on_stage=stages.append)
    assert calls == [1] and stages == [False, True]
    assert first == again and first["acc"] == 0.5 and first["git_commit"] == "abc" and "seconds" in first
    assert json.loads((tmp_path / "cells" / "full_zs-piqa.json").read_text()) == first
    assert not list((tmp_path / "cells").glob("*.tmp"))  # written through a temporary file, then renamed


def test_report_only_computes_nothing(tmp_path):
    store = CellStore(tmp_path, report_only=True)
    assert store.cell("missing", lambda: pytest.fail("report-only must not compute")) is None
    assert not list(tmp_path.glob("*.json"))


def test_a_failed_computation_leaves_no_cell(tmp_path):
    store = CellStore(tmp_path)

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.cell("x", boom)
    assert not list(tmp_path.iterdir())


def test_the_settings_record_refuses_other_settings_and_names_them(tmp_path):
    claim_folder(tmp_path, {"model": "default", "seed": 0})
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {"model": "default", "seed": 0}
    claim_folder(tmp_path, {"model": "default", "seed": 0})  # the same: accepted
    with pytest.raises(CellSettingsError, match=r"seed: 0 -> 1"):
        claim_folder(tmp_path, {"model": "default", "seed": 1})
    with pytest.raises(PipelineSettingsError):  # a caller's own error type
        claim_folder(tmp_path, {"model": "other", "seed": 0}, error=PipelineSettingsError)
    upgraded = {"model": "default", "seed": 0, "added": 3}
    claim_folder(tmp_path, upgraded, upgrade=lambda old, now: {**old, "added": 3})  # an older record upgraded


def test_report_only_records_nothing(tmp_path):
    claim_folder(tmp_path, {"seed": 0}, record=False)
    assert not (tmp_path / SETTINGS_FILE).exists()
