"""Video, pose and face maps must stay aligned after clip sampling, resize and crop."""
import numpy as np
import pytest
import torch

from datapipes import shards
from datapipes.loader import build_clip_loader
from datapipes.pose import keypoints_to_json
from datapipes.video import encode_mp4
from tests.data.conftest import loader_config

FRAMES, HEIGHT, WIDTH = 12, 64, 32


def _square_centre(t):
    return 6 + 1.5 * t, 10 + 3.5 * t   # x, y in source pixels: a square moving down-right


def _marker_video(height, width, colour):
    scale = height / HEIGHT
    video = np.zeros((FRAMES, height, width, 3), np.uint8)
    for t in range(FRAMES):
        x, y = (scale * v for v in _square_centre(t))
        half = 3 * scale
        video[t, int(round((y - half))):int(round(y + half)), int(round(x - half)):int(round(x + half))] = colour
    return video


def _write_marker_shard(directory):
    keypoints = np.zeros((FRAMES, 18, 3))
    for t in range(FRAMES):
        keypoints[t, 1] = (*_square_centre(t), 1.0)   # only the neck is visible
    meta = {"fps": 8, "num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "kind": "human",
            "source": "test", "license": "CC0-1.0"}
    with shards.ShardSink(str(directory), "marker") as sink:
        # pose video at half the video's resolution: the loader must map it with the same crop
        sink.write(shards.make_sample("marker-video", encode_mp4(_marker_video(HEIGHT, WIDTH, 255), 8), meta,
                                      pose_video=encode_mp4(_marker_video(HEIGHT // 2, WIDTH // 2, (255, 0, 0)), 8)))
        sink.write(shards.make_sample("marker-keypoints", encode_mp4(_marker_video(HEIGHT, WIDTH, 255), 8), meta,
                                      pose_keypoints=keypoints_to_json(keypoints, HEIGHT, WIDTH)))


def _centroids(frames):   # (F, 3, H, W) -> (F, 2) x, y of bright pixels
    mass = frames.amax(dim=1) > 0.5
    ys, xs = torch.meshgrid(torch.arange(mass.shape[1]), torch.arange(mass.shape[2]), indexing="ij")
    return torch.stack([torch.stack([(xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()]) for m in mass.float()])


@pytest.mark.parametrize("bucket", [[64, 32], [32, 64], [48, 40]])
def test_video_and_pose_stay_aligned_after_sampling_and_cropping(tmp_path, bucket):
    _write_marker_shard(tmp_path / "marker")
    cfg = loader_config(str(tmp_path / "marker"), num_frames=5, frame_stride=2, height=bucket[0],
                        width=bucket[1], batch_size=1, batches_per_epoch=12, scene_probability=None)
    seen = set()
    for batch in build_clip_loader(cfg, 0, 1):
        video = (batch["video"][0] + 1) / 2
        pose = batch["pose"][0]
        marker = video.amax(dim=1) > 0.5
        touches_edge = marker[:, 0].any(1) | marker[:, -1].any(1) | marker[:, :, 0].any(1) | marker[:, :, -1].any(1)
        # compare only frames where the crop keeps the whole marker (a cut marker moves its centroid)
        visible = marker.any(dim=(1, 2)) & ~touches_edge & (pose.amax(dim=(1, 2, 3)) > 0.5)
        if visible.sum() == 0:
            continue
        difference = (_centroids(video[visible]) - _centroids(pose[visible])).abs().max()
        assert difference < 1.6, (batch["__key__"], difference)
        seen.add(batch["__key__"][0])
    assert seen == {"marker-video", "marker-keypoints"}
