"""dsm_fast/tools/release.py: the released code's state-dict names ↔ ours (the names themselves are checked against the
release in tests/test_tools_parity.py)."""
import pytest
import torch

from dsm_fast.model import UNetEnergy
from dsm_fast.tools import release


@pytest.mark.parametrize("channels, numbers", [(3, 8_649_856), (1, 8_647_552)])
def test_paper_preset_maps_85_tensors_one_to_one(channels, numbers):
    mapping = release.key_map("paper", channels)
    shapes = release.expected_shapes("paper", channels)
    assert len(mapping) == 85 == len(set(mapping.values())) and list(mapping.values()) == list(shapes)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == numbers
    assert mapping["encoder.0.0.weight"] == "unet.encoder.0.0.conv.weight"
    assert mapping["decoder.2.0.weight"] == "unet.decoder.0.0.conv.weight"  # release decoder by scale, ours deepest first
    assert mapping["decoder.0.6.weight"] == "unet.decoder.2.2.conv.weight"  # the last conv: no normalization after it
    assert mapping["middle_block.4.conditioning_embedding.bias"] == "unet.middle.1.norm_act.modulation.bias"
    assert shapes["unet.encoder.0.0.conv.weight"] == (64, channels, 3, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_through_prefixed_release_names(channels):
    model = UNetEnergy(channels, "tiny")
    ours = model.state_dict()
    released = release.to_release(ours, "tiny", channels, prefix="network.module.")
    assert all(name.startswith("network.module.") for name in released)
    assert release.infer_channels(released) == channels
    back = release.from_release(released, "tiny")
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)
    UNetEnergy(channels, "tiny").load_state_dict(back)


def test_mismatches_name_the_first_tensor():
    released = release.to_release(UNetEnergy(3, "tiny").state_dict(), "tiny", 3)
    wrong = dict(released, **{"encoder.1.0.weight": torch.zeros(3, 3, 2, 2)})
    with pytest.raises(release.ReleaseMismatch, match=r"'encoder\.1\.0\.weight' has shape \(3, 3, 2, 2\)"):
        release.from_release(wrong, "tiny")
    missing = {k: v for k, v in released.items() if k != "middle_block.1.weight"}
    with pytest.raises(release.ReleaseMismatch, match=r"'middle_block\.1\.weight' .* is missing"):
        release.from_release(missing, "tiny")
    extra = dict(released, **{"encoder.0.1.bias": torch.zeros(8), "zzz": torch.zeros(1)})
    with pytest.raises(release.ReleaseMismatch, match=r"'encoder\.0\.1\.bias' is not part of .* \(2 unexpected"):
        release.from_release(extra, "tiny")
    with pytest.raises(release.ReleaseMismatch, match=r"time_embed\.0\.weight.* paper preset \(3 channels\) expects \(256, 64\)"):
        release.from_release(released, "paper", channels=3)  # the paper preset's first mismatch
    with pytest.raises(release.ReleaseMismatch, match="no first convolution"):
        release.infer_channels({"network.decoder.0.6.weight": torch.zeros(3, 8, 3, 3)})
