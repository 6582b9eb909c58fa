"""The authors' end-effector pose integration (notebooks/utils/mpc_utils.py
`compute_new_pose`) in torch, so a rollout's carried pose stays a tensor on the engine's
device instead of a round trip through scipy.

A pose and an action are [x, y, z, roll, pitch, yaw, gripper]: positions add, rotations
compose as R(action) @ R(pose) with extrinsic "xyz" Euler angles (scipy's convention:
R = Rz(yaw) Ry(pitch) Rx(roll)), the gripper adds and is clipped to [0, 1]. Rotations are
composed in float64 (scipy's precision) and the result returned in the pose's dtype.
"""

from __future__ import annotations

import torch


def euler_xyz_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Extrinsic xyz Euler angles [..., 3] -> rotation matrices [..., 3, 3]."""
    c, s = angles.cos(), angles.sin()
    cx, cy, cz = c.unbind(-1)
    sx, sy, sz = s.unbind(-1)
    rows = [
        cy * cz, cz * sx * sy - cx * sz, cx * cz * sy + sx * sz,
        cy * sz, cx * cz + sx * sy * sz, cx * sy * sz - cz * sx,
        -sy, cy * sx, cx * cy,
    ]
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def matrix_to_euler_xyz(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> extrinsic xyz Euler angles [..., 3]: pitch in
    [-pi/2, pi/2], roll and yaw in [-pi, pi] (scipy's ranges away from gimbal lock)."""
    pitch = torch.asin((-m[..., 2, 0]).clamp(-1.0, 1.0))
    roll = torch.atan2(m[..., 2, 1], m[..., 2, 2])
    yaw = torch.atan2(m[..., 1, 0], m[..., 0, 0])
    return torch.stack([roll, pitch, yaw], dim=-1)


def compute_new_pose(pose: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """pose, action [..., 7] -> the pose after the action [..., 7] (module docstring)."""
    xyz = pose[..., :3] + action[..., :3]
    rotation = (euler_xyz_to_matrix(action[..., 3:6].double())
                @ euler_xyz_to_matrix(pose[..., 3:6].double()))
    angles = matrix_to_euler_xyz(rotation).to(pose.dtype)
    gripper = (pose[..., 6:] + action[..., 6:]).clamp(0.0, 1.0)
    return torch.cat([xyz, angles, gripper], dim=-1)
