"""The live progress line: its smoothed loss is the exponential moving average of the step losses, kept on the
device and read only when the line is redrawn (never once per step)."""
import torch

from dsm_fast.progress import Progress


def test_smoothed_loss_is_the_moving_average_of_the_step_losses():
    losses = [None, 2.0, 1.0, None, 0.5, 0.25]  # None: a skipped step (a NaN loss, ok false), which the average ignores
    progress = Progress(total=6, initial=0, batch_size=8, enabled=False, window=4)
    expected = None
    for loss in losses:
        progress.step({"loss": torch.tensor(float("nan") if loss is None else loss), "ok": torch.tensor(loss is not None)})
        if loss is not None:
            expected = loss if expected is None else 0.75 * expected + 0.25 * loss
        if progress.first is None and loss == 1.0:
            progress.mark_logged()
    assert progress.first == 0.75 * 2.0 + 0.25 * 1.0
    assert abs(progress.smoothed() - expected) < 1e-6 and progress.count == 6
    progress.close()


def test_steps_never_read_the_device_between_redraws():
    # A meta tensor has no values: any host read (float(), .item(), printing) raises. Steps between redraws must
    # only queue device work.
    for enabled in (False, True):
        progress = Progress(total=50, initial=0, batch_size=8, enabled=enabled, interval=1e9)
        for _ in range(50):
            progress.step({"loss": torch.empty((), device="meta"), "ok": torch.empty((), dtype=torch.bool, device="meta")})
        assert progress.average.device.type == "meta" and progress.count == 50
        progress.close()
