"""torch_npu.npu under the emulation: one always-available device that is really the CPU."""


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def synchronize(device=None) -> None:
    """CPU ops are synchronous."""


class _Matmul:
    """torch_npu.npu.matmul.allow_hf32 (default False): irrelevant on the CPU, kept for the API."""
    allow_hf32 = False


matmul = _Matmul()
