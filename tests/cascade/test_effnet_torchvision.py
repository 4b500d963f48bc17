"""The pack's EfficientNetV2-S against torchvision's, the network the release was trained with.

torchvision has no CPU build for this machine's torch, so the project's venv cannot hold it and these tests
skip there. They run with any Python that has torch and torchvision, e.g. the ComfyUI venv of
docs/COMFYUI_INTEGRATION.md::

    /work/comfy/venv/bin/python -m pytest tests/cascade/test_effnet_torchvision.py -q

The release's encoder is torchvision's ``efficientnet_v2_s().features``; the effnet ControlNets replace its
stem by a padding-0 conv over their own input channels (SPEC §12.1). Same random weights in both, same input,
same output: an independent check of the block order, strides, paddings, SE widths and BatchNorm eps.
"""

from __future__ import annotations

import pytest
import tiny_checkpoints as tc
import torch
from torch import nn

from comfyui_stablecascade.cascade.controlnet import ControlNet, ControlNetConfig
from comfyui_stablecascade.cascade.effnet import EfficientNetEncoder, EffNetConfig, build_features

tv_models = pytest.importorskip(
    "torchvision.models",
    reason="torchvision is not installed in this Python (it has no CPU build beside torch 2.13.0 here); run "
    "this file with a Python that has it, e.g. ComfyUI's venv (docs/COMFYUI_INTEGRATION.md)",
)


def _torchvision_features(c_in: int = 3) -> nn.Sequential:
    features = tv_models.efficientnet_v2_s(weights=None).features
    if c_in != 3:
        features[0][0] = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False)  # the ControlNets' stem
    return features.eval()


@pytest.mark.parametrize("c_in", [3, 1], ids=["encoder", "controlnet-stem"])
def test_features_match_torchvision(c_in: int) -> None:
    ref = _torchvision_features(c_in)
    ref.load_state_dict(tc.bn_random_state_dict(ref, seed=c_in))
    ours = build_features(EffNetConfig(), c_in, 1 if c_in == 3 else 0).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, c_in, 96, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == want.shape and want.std() > 0.1
    # Same weights and ops through ~40 BatchNorm'd convs of two implementations: float32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_encoder_and_controlnet_backbone_load_torchvision_keys() -> None:
    """The released files prefix torchvision's keys with ``backbone.``; both networks take them as they are."""
    x3 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    x1 = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(13))
    for net, c_in, x in [(EfficientNetEncoder(device="meta"), 3, x3),
                         (ControlNet(ControlNetConfig.canny(), device="meta"), 1, x1)]:
        ref = _torchvision_features(c_in)
        ref.load_state_dict(tc.bn_random_state_dict(ref, seed=5 + c_in))
        sd = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
        own = {k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")}
        assert {k for k in net.state_dict() if k.startswith("backbone.")} == set(sd)
        sd.update({k: torch.randn(v.shape) for k, v in own.items()})
        net.load_state_dict(sd, strict=True, assign=True)
        with torch.no_grad():
            torch.testing.assert_close(net.backbone(x), ref(x), rtol=1e-4, atol=1e-4)  # as above: rounding only
