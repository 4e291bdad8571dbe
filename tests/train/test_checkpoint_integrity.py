"""A checkpoint whose bytes changed after it was written (a bad disk, a half-copied folder, a
hand edit) is never resumed from: the resume sets it aside and continues from the newest
intact one, and says so."""

from __future__ import annotations

import torch

from afinar.train import state as ckpt


def _save(run, step: int) -> None:
    param = torch.nn.Parameter(torch.full((4,), float(step)))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ckpt.save_checkpoint(run, ckpt.TrainState(global_step=step), {"w": param.detach()},
                         optimizer.state_dict(), scheduler, keep=3)


def test_a_damaged_newest_checkpoint_is_set_aside(tmp_path):
    run = tmp_path / "run"
    for step in (5, 10):
        _save(run, step)
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "step-000010" and ckpt.damage(newest) is None
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (newest / "state.pt").write_bytes(bytes(data))

    said = []
    found = ckpt.intact_checkpoint(run, lambda message, level: said.append((level, message)))
    assert found.name == "step-000005"
    assert ckpt.load_checkpoint(found)["state"]["global_step"] == 5
    assert (run / "checkpoints" / "damaged-step-000010").is_dir()
    assert said and said[0][0] == "warning" and "sha256" in said[0][1]
    assert ckpt.latest_checkpoint(run).name == "step-000005"  # the damaged one is out of sight


def test_a_write_that_never_finished_is_cleared_before_resuming(tmp_path):
    run = tmp_path / "run"
    _save(run, 4)
    partial = run / "checkpoints" / ".tmp-killed"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half")
    assert ckpt.intact_checkpoint(run).name == "step-000004"
    assert not partial.exists()


def test_a_truncated_only_checkpoint_leaves_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    _save(run, 3)
    state = ckpt.latest_checkpoint(run) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert ckpt.intact_checkpoint(run) is None
