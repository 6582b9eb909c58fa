"""Server settings (not the deployment): layered CLI > `MSTAR_*` environment > the YAML's
`server:` section > defaults. `mstar-serve` and `mstar serve` build one `ServerSettings`
and hand it, with the `DeploymentConfig`, to `mstar.serving.run_server`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Protocol = Literal["SHM", "TCP", "RDMA"]


class ServerSettings(BaseSettings):
    """Every option of `mstar-serve` (seed 000) plus the offline/weights options.

    `tensor_comm_protocol=None` means "the default": RDMA when Mooncake is installed,
    else SHM on a single node (logged). `mstar serve` passes SHM explicitly.
    """

    model_config = SettingsConfigDict(env_prefix="MSTAR_", extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    tensor_comm_protocol: Protocol | None = None
    cache_dir: str | None = None
    socket_path_prefix: str = "/tmp/mstar"
    upload_dir: str = "/tmp/mstar_uploads"
    timeout: float = Field(600.0, gt=0, description="Per-request timeout (seconds).")
    mooncake_port: int = Field(8080, ge=0, le=65535)
    tcp_transfer_device: str | None = None
    enable_nvtx: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    model_path: str | None = None
    revision: str | None = None
    load_format: Literal["auto", "dummy"] = "auto"
    preset: str | None = None
    api_key: str | None = None
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    startup_timeout: float = Field(600.0, gt=0)
    shutdown_grace: float = Field(30.0, ge=0)
