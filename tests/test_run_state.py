"""run_state.TrainingState: state.json read and written field for field, old files included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.run_state import TrainingState

GOLDEN_CHECKPOINT = Path(__file__).parent / "fixtures/golden_run/runs/golden/checkpoint-000004"


@pytest.mark.skipif(not GOLDEN_CHECKPOINT.is_dir(), reason="the golden run fixture is not present")
def test_a_state_written_by_earlier_code_reads_and_writes_back_unchanged():
    text = (GOLDEN_CHECKPOINT / "training_state/state.json").read_text()
    state = TrainingState.read(GOLDEN_CHECKPOINT)
    assert state.step == 4 and state.data_mode == "packed" and state.optimizer_saved
    assert state.to_json() == text  # the same keys, in the same order, with the same values


def test_missing_optional_keys_keep_the_meaning_of_their_absence(tmp_path):
    checkpoint = tmp_path / "checkpoint-000002"
    (checkpoint / "training_state").mkdir(parents=True)
    sections = {"model": {}, "data": {}, "train": {}}
    required = {"step": 2, "tokens_seen": 8, "epoch": 0, "batches_in_epoch": 2, "config": sections, "data_key": {}}
    (checkpoint / "training_state/state.json").write_text(json.dumps({**required, "added_later": 1}))
    state = TrainingState.read(checkpoint)
    assert (state.num_processes, state.optimizer_saved, state.optimizer_format, state.chat) == (1, True, None, False)
    assert state.val_loss is None and state.schedule is None


def test_resuming_needs_the_counters_generate_does_not(tmp_path):
    checkpoint = tmp_path / "checkpoint-000002"
    (checkpoint / "training_state").mkdir(parents=True)
    (checkpoint / "training_state/state.json").write_text(json.dumps({"step": 2, "chat": True}))
    with pytest.raises(FinetuneError, match="lacks 'tokens_seen'"):
        TrainingState.read(checkpoint)
    state = TrainingState.read_optional(str(checkpoint))
    assert state.chat and state.step == 2 and state.config is None
    assert TrainingState.read_optional(str(tmp_path)) == TrainingState()  # a model directory: nothing known
