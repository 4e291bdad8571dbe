"""The overfitting warning: held-out loss rising twice while training loss keeps falling."""

from __future__ import annotations

from afinar.train.loop import warn_overfitting


def _warnings(history):
    said = []
    warn_overfitting(history, lambda message, level="info": said.append((level, message)))
    return said


def test_warns_when_held_out_rises_as_train_falls():
    said = _warnings([(10, 2.0, 1.50), (20, 1.5, 1.60), (30, 1.0, 1.75)])
    assert len(said) == 1 and said[0][0] == "warning"
    assert "step 30" in said[0][1] and "1.500 → 1.750" in said[0][1]


def test_quiet_when_both_fall_or_when_training_loss_also_rises():
    assert _warnings([(10, 2.0, 1.5), (20, 1.5, 1.4), (30, 1.0, 1.3)]) == []
    assert _warnings([(10, 1.0, 1.5), (20, 1.5, 1.6), (30, 2.0, 1.7)]) == []  # diverging, not
    assert _warnings([(10, 2.0, 1.5), (20, 1.5, 1.6)]) == []  # too early to say
