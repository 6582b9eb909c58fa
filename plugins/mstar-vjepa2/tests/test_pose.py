"""`compute_new_pose` against the authors' (scipy's Rotation) numbers when scipy is
installed, and against the formula always."""

from __future__ import annotations

import math

import pytest
import torch

from mstar_vjepa2.pose import compute_new_pose, euler_xyz_to_matrix, matrix_to_euler_xyz


def poses_and_actions(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pose = torch.rand(n, 7, generator=gen) * 2 - 1
    pose[:, 3:6] *= math.pi * torch.tensor([1.0, 0.45, 1.0])  # away from gimbal lock
    action = torch.rand(n, 7, generator=gen) * 0.6 - 0.3
    return pose, action


def test_new_pose_matches_the_authors_scipy_rotations() -> None:
    """The authors' compute_new_pose, step by step with scipy (mpc_utils.py)."""
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    import numpy as np

    pose, action = poses_and_actions(0, 64)
    p, a = pose.numpy(), action.numpy()
    angles = [rotation.from_matrix(rotation.from_euler("xyz", da).as_matrix()
                                   @ rotation.from_euler("xyz", th).as_matrix()).as_euler("xyz")
              for th, da in zip(p[:, 3:6], a[:, 3:6])]
    want = np.concatenate([p[:, :3] + a[:, :3], np.stack(angles),
                           np.clip(p[:, -1:] + a[:, -1:], 0, 1)], axis=-1)
    got = compute_new_pose(pose, action)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(want).float(), atol=1e-6, rtol=0)


def test_new_pose_follows_the_formula() -> None:
    # translation and gripper add (the gripper clipped to [0, 1])
    pose = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0, 0.4, 0.9])
    action = torch.tensor([0.01, -0.02, 0.03, 0.0, 0.0, 0.25, 0.5])
    got = compute_new_pose(pose, action)
    torch.testing.assert_close(got[:3], pose[:3] + action[:3])
    assert float(got[6]) == 1.0
    # rotations about one axis compose by adding angles; across axes R(action) @ R(pose)
    torch.testing.assert_close(got[3:6], torch.tensor([0.0, 0.0, 0.65]))
    roll = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0])
    yaw = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0])
    composed = compute_new_pose(roll, yaw)[3:6].double()
    want = euler_xyz_to_matrix(yaw[3:6].double()) @ euler_xyz_to_matrix(roll[3:6].double())
    torch.testing.assert_close(euler_xyz_to_matrix(composed), want)
    # extrinsic xyz: Rz(yaw) @ Ry(pitch) @ Rx(roll)
    x, y, z = 0.3, -0.5, 1.1
    rx = torch.tensor([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = torch.tensor([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    m = euler_xyz_to_matrix(torch.tensor([x, y, z]))
    torch.testing.assert_close(m, rz @ ry @ rx)
    torch.testing.assert_close(matrix_to_euler_xyz(m), torch.tensor([x, y, z]))
    # batched like the authors' [B, 1, 7]
    pose_b, action_b = poses_and_actions(1, 5)
    torch.testing.assert_close(compute_new_pose(pose_b[:, None], action_b[:, None])[:, 0],
                               torch.stack([compute_new_pose(p, a)
                                            for p, a in zip(pose_b, action_b)]))
