"""The two ceilings every GPU kernel time is put against (METHOD.md): device-to-device copy bandwidth (bytes read +
written) and the bf16 matrix-product rate, measured with CUDA events on this GPU. Writes JSON to argv[1]."""

import json
import sys

import torch


def _time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    src = torch.randn(2**30 // 4, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = _time_ms(lambda: a @ b, reps=10)
    result = {
        "device": torch.cuda.get_device_name(),
        "copy_GBps_read_plus_write": 2 * src.numel() * 4 / copy_ms / 1e6,
        "bf16_gemm_TFLOPs": 2 * 8192**3 / gemm_ms / 1e9,
    }
    print(json.dumps(result))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
