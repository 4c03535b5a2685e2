"""Face re-enactment factories for the ``data.face_reenactor`` tests (imported by dotted path)."""

import torch


def constant_face(value: float = 0.5):
    """A stand-in re-enactor: every frame becomes ``value`` grey (so its S-Face maps are known)."""
    def reenact(frames, faces, rng):
        return torch.full_like(frames, value)
    return reenact


NOT_CALLABLE = 3
