"""Device, precision, ranks and compile: decided once, here, for train.py and the bench alike.

- `setup_env(cfg)` -> `Env`: the device, bf16 autocast and the loader's dtype on CUDA (fp32 on
  CPU), DDP ranks from torchrun's variables, and the CPU thread counts;
- `compile_checked` -> `CompileCheck`: torch.compile, used only when every graph the trainer
  needs builds and agrees with eager; `CompileCheck.compiled` is the one flag read everywhere.
"""
import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class Env:
    device: torch.device
    autocast: object = contextlib.nullcontext  # a context factory: bf16 autocast on CUDA, nothing on CPU
    dtype: torch.dtype = torch.float32  # of the batches the loader hands the model: bf16 on CUDA (half the bytes)
    memory_format: torch.memory_format = torch.channels_last  # of the model and its batches (--no-channels-last: NCHW)
    rank: int = 0
    world: int = 1
    ddp: bool = False
    batch: int = None  # this rank's share of the global train batch (--batch-size): images per step here
    threads: int = None  # torch's intra-op CPU threads (None: as torch set them)
    dali_threads: int = 1  # DALI's CPU threads: its CPU operators, and on a GPU the CPU side of the graph
    threads_why: str = ""  # how the counts were chosen, for the start line

    @property
    def master(self):
        return self.rank == 0

    @property
    def precision_and_layout(self):
        """How the model's batches run, for the start line: "bf16 channels_last", "fp32 NCHW"."""
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        return f"{dtype} {'channels_last' if self.memory_format == torch.channels_last else 'NCHW'}"

    @property
    def name(self):
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def loader_args(self, seed):
        """What every loader of a run shares: this rank's shard, on its device, in the model's dtype and layout."""
        return dict(device=self.device, seed=seed, shard_id=self.rank, num_shards=self.world, dtype=self.dtype,
                    memory_format=self.memory_format, num_threads=self.dali_threads)


def memory_format(channels_last):
    """The layout a run asks for (--channels-last / --no-channels-last): of the model and of its batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


def setup_env(cfg, threads_kept=False):
    """Device, precision and ranks for `cfg.device` ("cuda" or "cpu"); torchrun's variables mean DDP.

    threads_kept: `cfg.threads` is a resumed run's own count, not one given now (the start line says which)."""
    ddp, cuda = "RANK" in os.environ, cfg.device == "cuda"
    rank, world, local = 0, 1, 0
    if ddp:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if cuda:
            torch.cuda.set_device(local)  # before anything touches CUDA, or ranks pile onto GPU 0
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        configure_cuda()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores, idle = len(os.sched_getaffinity(0)), idle_cores()
    if cuda:  # the GPU does the work; DALI's CPU side (callbacks, argument inputs) gets a few threads
        threads, dali_threads = cfg.threads or torch.get_num_threads(), max(1, min(4, cores // local_world))
    else:
        # The model is ~1000x the pipeline's CPU work: torch gets the cores and DALI one thread. Only
        # the cores idle now: torch's threads wait for each other at every op, so one thread short of
        # a core (another busy process) cost 2.3x here (6-7 against 16 img/s; 11 with one thread).
        threads, dali_threads = cfg.threads or max(1, idle // local_world), 1
        keep_freed_memory()
    torch.set_num_threads(threads)
    why = f"{cores} cores, {idle} idle at start" + (f", {local_world} ranks on this machine" if local_world > 1 else "")
    return Env(device=torch.device(f"cuda:{local}" if cuda else "cpu"),
               autocast=bf16_autocast if cuda else contextlib.nullcontext,
               dtype=torch.bfloat16 if cuda else torch.float32,
               memory_format=memory_format(cfg.channels_last), rank=rank, world=world, ddp=ddp,
               batch=cfg.batch_size // world if cfg.batch_size else None, threads=threads,
               dali_threads=dali_threads,
              threads_why=why + (", the run's own count, kept on resume (--threads changes it)"
                                                             if threads_kept else ", --threads "
                                                                                  "given" if cfg.threads else ""))


def keep_freed_memory():
    """On a CPU, have glibc's malloc keep freed memory for the next allocation instead of handing it back to the
    kernel: every activation of a step is a fresh tensor of up to ~0.5 GB, and a fresh mapping costs a page fault
    per 4 KB page on first touch. Measured here (2-core AMD EPYC, torch 2.13): relu(s * y + t) into a new 134 MB
    tensor took 86 ms with the default (large blocks mmapped and returned), 14 ms with this; a preallocated copy 12;
    the eager step went from 11 to 17 img/s. Not glibc (musl, macOS): nothing to do, False."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def any_rank(flag, env):
    """True on every rank when it is true on any (one all-reduce under DDP): how the ranks agree
    to stop, or to save, at the same step."""
    if not env.ddp:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # sync: only where ranks must agree


def assert_ranks_agree(model):
    """DDP keeps replicas identical; check it cheaply (one number per rank) after every epoch."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    every = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(every, total)
    assert all(torch.equal(t, every[0]) for t in every), f"ranks disagree on the weights: {every}"


def exit_rank(code):
    """Leave a torchrun rank without tearing the interpreter down.

    A finished rank could abort (SIGABRT, "terminate called without an active exception") after
    its last line of Python, in 3 of 41 two-rank CPU runs under load, with no Python frame on the
    stack: the signature of a native thread (gloo's or DALI's) reaching for the GIL while the
    interpreter is finalized (see PyTorch PR #179291). So: free what reference cycles still hold
    while Python is alive, close the process group, flush, and exit without finalizing.
    Everything the run writes is closed and renamed by now.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def idle_cores(seconds=0.2):
    """How many of the cores this process may use were idle over `seconds` (/proc/stat; all of them
    where that cannot be read): a busy process elsewhere takes a core from our threads."""
    allowed = len(os.sched_getaffinity(0))

    def idle_and_total():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = idle_and_total()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return allowed
    busy = round((1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or allowed))
    return max(1, min(allowed, (os.cpu_count() or allowed) - busy))


def configure_cuda():
    """The CUDA settings training runs with (the bench calls this too, so it times the same thing)."""
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    # TF32 through the legacy flags only: mixing them with the new fp32_precision API makes Inductor raise.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def bf16_autocast():
    """The CUDA precision: matmuls and convs in bf16 (no loss scaling needed), reductions in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16)


@dataclass
class CompileCheck:
    """What `compile_checked` found. `model` is what to run; `compiled` is the one flag read everywhere."""
    model: torch.nn.Module
    compiled: bool
    seconds: float = None  # compiling and running every graph the trainer needs (None: not tried)
    graphs: int = 0  # Dynamo graphs built: the trainer needs exactly two (eval forward; train forward + backward)
    error: float = None  # max |compiled - fp32 eager| / max |fp32 eager|, eval forward
    eager_error: float = None  # the same for eager at the training precision: what rounding alone costs
    note: str = None  # why it fell back to eager, for the log


def relative_error(out, reference):
    return ((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()  # sync: at start


def compile_checked(model, env, *, eval_batch, train_batch, mode="default", compiler=None):
    """torch.compile with static shapes, used only if every graph the trainer needs compiles and agrees.

    Both graphs are built and run here, not lazily inside the first step: the eval forward at
    `eval_batch` (compared, with eager at the training precision, against an fp32 eager
    reference: accepted when the compiled error is at most twice eager's plus 1e-4), and a
    training forward + backward at `train_batch` (loss and gradients must be finite; dropout
    draws differ between Inductor and eager, so its values are not compared). The training pass
    runs on `model` itself, whose weights, BatchNorm statistics, gradients and RNG are restored
    after, so the graph built is the one the trainer will hit. Any compiler exception, or a
    disagreement, means eager with a note; under DDP all ranks run eager if any rank rejects.
    `compiler` stands in for torch.compile (the tests pass failing and wrong ones).

    dynamic=False: evaluation and training run different batch sizes, and a second shape would
    otherwise turn the graph into a dynamic-shape one. Past Dynamo's recompile limit torch
    would silently run eager; here it is an error. Inductor's max-autotune conv template has
    returned wrong results (PyTorch issue #173068): hence the comparison.

    An NCHW run (`env.memory_format`, --no-channels-last) compiles with Inductor's layout
    optimisation off: left on, Inductor turns this model's convs to channels_last by itself (its
    heuristic keeps that layout for depthwise convs), and NCHW would be asked for but not run.
    """
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a graph per new shape is a bug, not a fallback
    counters = torch._dynamo.utils.counters["stats"]
    graphs_before, t0 = counters["unique_graphs"], time.perf_counter()
    check = CompileCheck(model=model, compiled=False)
    gen = torch.Generator(device=env.device).manual_seed(0)

    def batch(n):  # inputs as the loader hands them: the training dtype and memory layout
        x = torch.randn(n, 3, 32, 32, device=env.device, generator=gen).to(env.dtype)
        return x.contiguous(memory_format=env.memory_format)

    was_training, fast = model.training, None
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the check's training pass moves BN statistics
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None
    layout = contextlib.nullcontext()
    if env.memory_format != torch.channels_last:  # NCHW asked for: Inductor keeps the convs in it
        from torch._inductor import config as inductor  # here, not at the top: it loads Dynamo (2 s)

        layout = inductor.patch(layout_optimization=False)
    try:
        with layout:  # both graphs are compiled here, at their first call
            fast = (compiler or torch.compile)(model, mode=mode, dynamic=False)
            model.eval()
            x = batch(eval_batch)
            with torch.no_grad():
                reference = model(x.float())
                with env.autocast():
                    eager, out = model(x), fast(x)
            check.error, check.eager_error = relative_error(out, reference), relative_error(eager, reference)
            model.train()
            x, y = batch(train_batch), torch.randint(0, 10, (train_batch,), device=env.device, generator=gen)
            with env.autocast():
                loss = F.cross_entropy(fast(x), y)
            loss.backward()
            grads_finite = torch.stack([torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None])
            finite = bool(torch.isfinite(loss) & grads_finite.all())  # sync: once, at start
            if not finite:
                check.note = "the compiled training step gave a non-finite loss or gradient"
            elif check.error > 2 * check.eager_error + 1e-4:
                check.note = (f"the compiled model disagrees with eager (relative error {check.error:.2e} against "
                              f"fp32, eager at training precision {check.eager_error:.2e})")
            else:
                check.model, check.compiled = fast, True
    except Exception as e:  # any compiler failure: train eager rather than not at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        check.note = f"torch.compile failed ({type(e).__name__}: {first})"
    finally:  # the model leaves the check as it came in
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], env.device)
    if env.ddp:  # one verdict for all ranks, or DDP would pair a compiled rank with an eager one: compiled
        verdict = torch.tensor([int(check.compiled)], device=env.device)  # only where every rank accepted
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        if check.compiled and not verdict.item():
            check.compiled, check.model, check.note = False, model, "another rank rejected the compiled model"
    check.seconds, check.graphs = time.perf_counter() - t0, counters["unique_graphs"] - graphs_before
    if check.note:
        check.note += "; training eager"
    return check
