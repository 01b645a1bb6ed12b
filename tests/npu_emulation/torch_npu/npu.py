"""torch_npu.npu under the emulation: one always-available device that is really the CPU."""


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def synchronize(device=None) -> None:
    """CPU ops are synchronous."""
