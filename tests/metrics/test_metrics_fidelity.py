import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xdyna.metrics import fidelity
from xdyna.metrics.lpips import LPIPSVGG, shipped_lpips_heads
from xdyna.metrics.sources import VideoSource
from xdyna.metrics.weights import load_checkpoint


def _synthetic_pair(seed=0, shape=(3, 3, 40, 36)):
    generator = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    noise = torch.randint(-40, 41, shape, generator=generator)
    pred = (gt.long() + noise).clamp(0, 255).to(torch.uint8)
    return pred, gt


def _real_pair(examples):
    video = VideoSource(examples / "example_1_driving.mp4")
    frames = video.read(0, 9)
    crop = (slice(None), slice(None), slice(250, 410), slice(120, 248))  # 160 x 128 around the person
    return frames[[8]][crop].contiguous(), frames[[0]][crop].contiguous()


@pytest.fixture(params=["synthetic", "real"])
def frame_pair(request):
    if request.param == "synthetic":
        return _synthetic_pair()
    return _real_pair(request.getfixturevalue("examples"))


@pytest.fixture(scope="module")
def lpips_net():
    torch.manual_seed(0)
    net = LPIPSVGG()
    heads = shipped_lpips_heads()
    net.load_heads(load_checkpoint(heads), heads.path)
    return net


def _hwc(frames):
    return frames.permute(0, 2, 3, 1).numpy()


def test_psnr_ssim_l1_match_scikit_image(frame_pair):
    pred, gt = frame_pair
    ours_psnr = fidelity.fidelity_per_frame("psnr", pred, gt)
    ours_ssim = fidelity.fidelity_per_frame("ssim", pred, gt)
    ours_l1 = fidelity.fidelity_per_frame("l1", pred, gt)
    for i, (p, g) in enumerate(zip(_hwc(pred).astype(np.float64) / 255, _hwc(gt).astype(np.float64) / 255)):
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(g, p, data_range=1.0), abs=1e-3)
        reference = structural_similarity(g, p, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
        assert ours_ssim[i] == pytest.approx(reference, abs=2e-4)
        assert ours_l1[i] == pytest.approx(np.abs(p - g).mean(), abs=1e-6)


def test_disco_variants_equal_their_formulas(frame_pair):
    pred, gt = frame_pair
    height, width = pred.shape[-2:]
    for i, (p, g) in enumerate(zip(_hwc(pred), _hwc(gt))):
        # DisCo: mse = np.mean((uint8 - uint8) ** 2); psnr = 20 log10(255 / sqrt(mse))
        mse = np.mean((p - g) ** 2)
        assert fidelity.disco_psnr(pred, gt)[i] == pytest.approx(20 * np.log10(255.0 / np.sqrt(mse)), rel=1e-12)
        # DisCo: |a - b| / (H * W) element-wise, averaged
        l1 = np.mean(np.abs(p.astype(float) - g.astype(float)) / (height * width))
        assert fidelity.disco_l1(pred, gt)[i] == pytest.approx(l1, rel=1e-12)
        # DisCo: skimage SSIM defaults on OpenCV grayscale (BT.601 weights, rounded to uint8)
        gray_p = np.round(p @ [0.299, 0.587, 0.114]).astype(np.uint8)
        gray_g = np.round(g @ [0.299, 0.587, 0.114]).astype(np.uint8)
        assert fidelity.disco_ssim(pred, gt)[i] == pytest.approx(structural_similarity(gray_p, gray_g, data_range=255), abs=3e-3)


def test_disco_psnr_differs_from_correct_psnr_by_the_uint8_wrap():
    gt = torch.full((1, 3, 16, 16), 10, dtype=torch.uint8)
    pred = torch.full((1, 3, 16, 16), 26, dtype=torch.uint8)  # diff 16: 16**2 = 256 wraps to 0 in uint8
    assert fidelity.disco_psnr(pred, gt)[0] == 100.0  # DisCo reads a zero MSE
    assert fidelity.fidelity_per_frame("psnr", pred, gt)[0] == pytest.approx(20 * np.log10(255 / 16), abs=1e-4)


def test_opencv_gray_fixed_point_is_within_one_level_of_bt601():
    rgb = np.random.default_rng(0).integers(0, 256, (1000, 3)).astype(np.uint8)
    assert np.abs(fidelity.opencv_gray(rgb).astype(int) - np.round(rgb @ [0.299, 0.587, 0.114])).max() <= 1


def test_lpips_equals_torchmetrics_with_the_same_weights(frame_pair, lpips_net):
    from torchmetrics.functional.image.lpips import _LPIPS

    reference = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()  # random trunk: no download
    # torchmetrics names the trunk ``sliceK.<torchvision index>.weight``; ours is ``<index>.weight``.
    trunk = {key.split(".", 1)[1]: value for key, value in reference.net.state_dict().items()}
    lpips_net.features.load_state_dict(trunk)
    pred, gt = frame_pair
    pred_float, gt_float = fidelity.to_unit_float(pred), fidelity.to_unit_float(gt)
    with torch.no_grad():
        expected = reference(pred_float, gt_float, normalize=True).flatten()
        expected_disco = reference(pred_float, gt_float, normalize=False).flatten()  # DisCo's [0, 1] misuse
    assert torch.allclose(fidelity.fidelity_per_frame("lpips", pred, gt, lpips_net).float(), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(fidelity.fidelity_per_frame("disco_lpips", pred, gt, lpips_net).float(), expected_disco,
                          rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, expected_disco)


def test_mismatched_frames_raise():
    pred, gt = _synthetic_pair()
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity.fidelity_per_frame("psnr", pred, gt[:, :, :-2])
    with pytest.raises(ValueError, match="uint8"):
        fidelity.disco_psnr(pred.float(), gt.float())
