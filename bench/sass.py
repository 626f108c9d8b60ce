"""Building a Triton kernel for sm_90a (H100, H200) without a GPU, and reading its machine code.

A kernel is built by the installed Triton's own compiler and ptxas, specialised exactly as its launcher would
specialise it; cuobjdump gives its registers and stack, nvdisasm its SASS; `program_path` reads from the SASS the
instructions one program issues, each loop's body apart. `build_request` turns a recorded launch (net/kernels.py's
`recording()`) into plain data, so `build_all` can build many in worker processes. bench/roofline.py counts with them.
"""
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGET = 90  # sm_90a, both GPUs

# --- building a kernel for sm_90a -----------------------------------------------------------------------------

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
           torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8"}


def specialise(fn, named, plain=()):
    """(signature, constants, attrs) for triton.compile, as a launch with these arguments ({parameter: value}, a
    value may be a tensor, an int, a float, or a string naming a type: "*bf16", "fp32") would specialise `fn`:
    constexprs as given; an int 1 a constant; an int that is a multiple of 16, and every pointer (torch's
    allocations are 16-byte aligned), known divisible by 16; the parameters named in `plain` (the kernel's
    do_not_specialize) neither."""
    signature, constants, attrs = {}, {}, {}
    params = inspect.signature(fn).parameters
    for i, (name, param) in enumerate(params.items()):
        value = named[name]
        if name in plain:
            signature[name] = "i32"
            continue
        if "constexpr" in str(param.annotation) or (type(value) is int and value == 1):
            signature[name], constants[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            kind = POINTER[value.dtype]
        elif isinstance(value, bool):
            kind = "i1"
        elif isinstance(value, int):
            kind = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            kind = "fp32"
        else:
            kind = value
        signature[name] = kind
        if kind.startswith("*") or isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


@dataclass
class Build:
    """A kernel built for sm_90a: its resources, and its SASS (instructions and labels, in order) where it was
    disassembled (nvdisasm takes half a second a kernel: the build test needs only the resources)."""
    registers: int  # per thread
    stack: int  # bytes of local memory per thread: spills, for these kernels
    sass: list = None
    spills: int = None  # local loads and stores (LDL, STL) in the SASS


def _bin(tool):
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def build(fn, named, num_warps, disassemble=True):
    """`fn` (a Triton function) built for sm_90a as `named` specialises it, with `num_warps`: registers and stack
    from cuobjdump, and (`disassemble`) the SASS from nvdisasm."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    plain = [p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)]
    signature, constants, attrs = specialise(fn.fn, named, plain)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", TARGET, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        b = Build(registers=int(re.search(r"REG:(\d+)", usage)[1]), stack=int(re.search(r"STACK:(\d+)", usage)[1]))
        if disassemble:
            b.sass = parse_sass(subprocess.run([_bin("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                                               check=True).stdout)
            b.spills = sum(1 for kind, text in b.sass if kind == "op" and re.search(r"\b(LDL|STL)\b", text))
    return b


# --- reading its machine code ---------------------------------------------------------------------------------

INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;?\s*$")
LABEL = re.compile(r"^(\.L_x_\d+):")


def parse_sass(text):
    """[("label", name) | ("op", instruction)] of nvdisasm's listing, in order."""
    lines = []
    for line in text.splitlines():
        if m := LABEL.match(line):
            lines.append(("label", m[1]))
        elif m := INSTRUCTION.match(line):
            lines.append(("op", m[1]))
    return lines


@dataclass
class ProgramPath:
    """The instructions a program issues: `straight` on its way once through, and each loop's body (its
    instructions between the loop's label and its branch back, in order), which runs once more per extra trip."""
    straight: int
    loops: list = field(default_factory=list)

    def per_program(self, trips):
        """Instructions one program issues with `trips` (one per loop) trips of its loops."""
        return self.straight + sum(body * (t - 1) for body, t in zip(self.loops, trips))


def program_path(sass):
    """The path a program takes when each loop runs at least once: from the entry, every instruction in order; a
    conditional branch forward is not taken (on these kernels: the skip of a loop that runs no trip, or of a
    tail); an unconditional one is; a branch back to a label is a loop's back-edge (its body is counted once here,
    the trips by `ProgramPath.per_program`); the first unconditional EXIT ends it. Loops within loops are refused."""
    at = {name: i for i, (kind, name) in enumerate(sass) if kind == "label"}
    straight, loops, spans, i = 0, [], [], 0
    while i < len(sass):
        kind, text = sass[i]
        if kind == "label":
            i += 1
            continue
        straight += 1
        opcode = text.split()[1] if text.startswith("@") else text.split()[0]
        conditional = text.startswith("@")
        if opcode == "EXIT" and not conditional:
            return ProgramPath(straight, loops)
        if opcode.startswith("BRA"):
            target = at[re.search(r"\((\.L_x_\d+)\)", text)[1]]
            if target < i:  # a loop: its body is everything from its label to here
                if any(start <= target < end or target <= start < i for start, end in spans):
                    raise NotImplementedError("a loop within a loop: the counter knows one level")
                spans.append((target, i))
                loops.append(sum(1 for k, _ in sass[target:i + 1] if k == "op"))
            elif not conditional:
                i = target
                continue
        i += 1
    raise ValueError("no unconditional EXIT: not a kernel's listing?")


# --- a recorded launch's build, in worker processes -----------------------------------------------------------

def _jit(kernel):
    """A launch's kernel as a Triton JITFunction (net/kernels.py's are plain functions until first run)."""
    from net import kernels

    return kernel if hasattr(kernel, "fn") else kernels._compiled(kernel, False)


def build_request(launch, tile):
    """What a launch at `tile` asks the compiler for, as plain data (for a worker process): (module, kernel name,
    its arguments by name with each tensor as its pointer type, num_warps)."""
    jit = _jit(launch.kernel)
    named = launch.named({k: v for k, v in tile.items() if k != "num_warps"})
    plain = {p.name for p in getattr(jit, "params", ()) if getattr(p, "do_not_specialize", False)}
    params = inspect.signature(jit.fn).parameters.items()
    key = tuple((name, named[name] if "constexpr" in str(p.annotation) else "i32" if name in plain
                 else _specialised(named[name])) for name, p in params)
    return jit.fn.__module__, jit.fn.__name__, key, tile["num_warps"]


def _specialised(value):
    """An argument as the build sees it: a tensor its pointer type (pointers taken as aligned), an int only
    whether it is 1 or a multiple of 16 (a stand-in with the same specialisation), the rest as is."""
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if type(value) is int:
        return 1 if value == 1 else 16 if value % 16 == 0 else 17
    return value


def build_requested(request, disassemble=True):
    """`build` of a `build_request`, in whichever process runs it."""
    import importlib

    module, name, key, num_warps = request
    kernel = getattr(importlib.import_module(module), name)
    return build(_jit(kernel), dict(key), num_warps, disassemble)


def build_all(requests, workers=None, disassemble=True):
    """{request: Build} for every distinct request, built by `workers` processes (default: one per core): the
    compiler is single-threaded, and the builds are most of this row's time."""
    import concurrent.futures
    import multiprocessing

    todo = list(dict.fromkeys(requests))
    workers = min(workers or os.cpu_count() or 1, len(todo)) or 1
    if workers == 1:
        return {r: build_requested(r, disassemble) for r in todo}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(todo, pool.map(build_requested, todo, [disassemble] * len(todo))))
