"""The one place a device name from a config or a command line becomes a ``torch.device``."""

from __future__ import annotations

import torch


class DeviceUnavailableError(ValueError):
    """The named device does not exist on this machine; the message names the setting."""


def pick_device(name: str, setting: str = "device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    ``setting`` names where the value came from (``run config: key 'device'``, ``--device``), so the
    error says what to change.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{setting} = {name!r}: CUDA is not available here")
    return device
