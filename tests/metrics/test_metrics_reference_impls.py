"""The metric backbones against independent implementations on shared random weights.

References (installed from PyPI, the ``dev`` extra): pytorch-fid's FID Inception (its
``FIDInceptionA/C/E_1/E_2`` blocks, assembled as its ``fid_inception_v3`` does, minus the
download), torch-fidelity's ``FeatureExtractorInceptionV3`` (given a local weights file), and
cd-fvd's copies of piergiaj's ``InceptionI3d`` and of the VideoMAE-v2 ``VisionTransformer``
(the code content-debiased FVD runs). Every parameter and buffer is random, so a wrong
block, pooling, padding or norm shows as a feature that does not match."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from xdyna.metrics.i3d import InceptionI3D
from xdyna.metrics.inception import FIDInceptionV3
from xdyna.metrics.videomae import VideoMAEv2Features, convert_videomae_v2_state_dict, to_videomae_v2_original

# float32 agreement: the largest difference relative to the largest feature magnitude.
RELATIVE_TOLERANCE = 1e-5


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter and float buffer, scaled so deep stacks stay finite:
    weights ~ N(0, 1/fan_in), norm scales in [0.5, 1.5], shifts and means ~ N(0, 0.1^2),
    running variances in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var") or (tensor.dim() == 1 and name.endswith("weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif tensor.dim() >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=g) / tensor[0].numel() ** 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
    return module


def assert_features_agree(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and torch.isfinite(expected).all()
    scale = expected.abs().max()
    assert scale > 0
    worst = ((got - expected).abs().max() / scale).item()
    assert worst < RELATIVE_TOLERANCE, f"features differ by {worst:.2e} of their scale"


@pytest.fixture(scope="module")
def fid_inception() -> FIDInceptionV3:
    return randomise(FIDInceptionV3(), seed=1)


def test_fid_inception_equals_pytorch_fid(fid_inception):
    from pytorch_fid import inception as pytorch_fid

    # pytorch-fid's fid_inception_v3() without its download: the same torchvision net and blocks.
    reference = pytorch_fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    reference.Mixed_5b = pytorch_fid.FIDInceptionA(192, pool_features=32)
    reference.Mixed_5c = pytorch_fid.FIDInceptionA(256, pool_features=64)
    reference.Mixed_5d = pytorch_fid.FIDInceptionA(288, pool_features=64)
    reference.Mixed_6b = pytorch_fid.FIDInceptionC(768, channels_7x7=128)
    reference.Mixed_6c = pytorch_fid.FIDInceptionC(768, channels_7x7=160)
    reference.Mixed_6d = pytorch_fid.FIDInceptionC(768, channels_7x7=160)
    reference.Mixed_6e = pytorch_fid.FIDInceptionC(768, channels_7x7=192)
    reference.Mixed_7b = pytorch_fid.FIDInceptionE_1(1280)
    reference.Mixed_7c = pytorch_fid.FIDInceptionE_2(2048)
    reference.load_state_dict(fid_inception.net.state_dict())  # strict: every tensor shared

    original = pytorch_fid.fid_inception_v3
    pytorch_fid.fid_inception_v3 = lambda: reference  # its wrapper builds the blocks from this net
    try:
        wrapper = pytorch_fid.InceptionV3([pytorch_fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                          normalize_input=True, use_fid_inception=True).eval()
    finally:
        pytorch_fid.fid_inception_v3 = original
    frames = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(2))  # resized to 299 by both
    with torch.no_grad():
        expected = wrapper(frames)[0].flatten(1)
        assert_features_agree(fid_inception(frames), expected)


def test_fid_inception_network_equals_torch_fidelity(fid_inception, tmp_path):
    """torch-fidelity follows the TF graph exactly: uint8 input, TF1-style resize, ``(x - 128) / 128``.
    At 299x299 its resize is the identity, and frames ``(x - 128) / 256 + 0.5`` make our
    ``2 x - 1`` the same input, so this compares the networks themselves (preprocessing: the
    ``pytorch-fid`` convention, see docs/metrics.md)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.save(fid_inception.net.state_dict(), tmp_path / "inception.pt")
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(tmp_path / "inception.pt"))
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        expected, logits = reference(images)
        got = fid_inception((images.float() - 128) / 256 + 0.5)
        assert_features_agree(got, expected)
        assert_features_agree(got @ fid_inception.net.fc.weight.T, logits)  # the 1008-class head too


@pytest.mark.parametrize("feature", ["pool", "logits"])
def test_i3d_equals_piergiaj_inception_i3d(feature):
    """cd-fvd's copy of piergiaj/pytorch-i3d (BatchNorm eps 1e-5, as the DTFVD copy). Its
    ``AvgPool3d([2, 7, 7])`` is the global average at the 16 x 224 x 224 protocol size; at the
    small test size the pre-pool features are averaged and its logits unit applied, as at that size."""
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    reference = randomise(InceptionI3d(400, in_channels=3), seed=4).eval()
    ours = InceptionI3D(400, input_size=64, feature=feature, bn_eps=1e-5)
    ours.load_state_dict(reference.state_dict())  # strict: the piergiaj layout, every tensor shared
    clips = torch.rand(2, 8, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # already at input_size
    with torch.no_grad():
        pooled = reference.extract_pre_pool_features(2 * clips.transpose(1, 2) - 1).mean(dim=(2, 3, 4), keepdim=True)
        expected = pooled.flatten(1) if feature == "pool" else reference.logits(pooled).flatten(1)
        assert_features_agree(ours(clips), expected)


def test_videomae_v2_equals_the_original_vision_transformer():
    """cd-fvd's VideoMAE-v2 ``VisionTransformer.forward_features`` (fc_norm of the token mean) on
    random weights in the original key layout, converted to ours by the shipped converter.
    16 frames: the original code assumes 8 temporal positions (16 frames, tubelet 2)."""
    from cdfvd.third_party.VideoMAEv2.videomaev2_finetune import VisionTransformer

    config = dict(image_size=32, patch_size=8, num_frames=16, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6)
    reference = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
                                  norm_layer=partial(nn.LayerNorm, eps=1e-6), all_frames=16, tubelet_size=2,
                                  use_mean_pooling=True, num_classes=3)  # a head, as the SSv2 checkpoint's (dropped)
    randomise(reference, seed=6).eval()
    ours = VideoMAEv2Features(**config)
    original = reference.state_dict()
    converted = to_videomae_v2_original(ours.state_dict())
    # The original layout key for key (pos_embed: a fixed table, not in the state dict; head: dropped).
    assert set(converted) == {k for k in original if not k.startswith("head.")}
    missing, unexpected = ours.load_state_dict(convert_videomae_v2_state_dict(original), strict=False)
    assert not unexpected and all(k.endswith("attention.attention.key.bias") or "position_embeddings" in k for k in missing)
    clips = torch.rand(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # already at image_size
    with torch.no_grad():
        expected = reference.forward_features(clips.transpose(1, 2))
        assert_features_agree(ours(clips), expected)
