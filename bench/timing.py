"""How every figure is taken: warm-up first, then timed repeats between synchronisations."""
import statistics
import time


def measure(step, *, images_per_step, steps, repeats, warmup, sync):
    """Median images/s of `step()` over `repeats` timed runs of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()  # the work queued on the device is part of the time
        rates.append(images_per_step * steps / (time.perf_counter() - t0))
    return {"img_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats,
            "batch": images_per_step}


def endless(loader):
    """Batches across epoch boundaries: a new epoch (and DALI pipeline) is part of the cost."""
    while True:
        yield from loader
