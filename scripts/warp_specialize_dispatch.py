"""Triton's warp-specialize dispatch, as racecheck sees it: a reference kernel and the SASS that identifies it.

`gl.warp_specialize` lowers (Triton 3.6, ConvertWarpSpecializeToLLVM) to a
switch loop. The worker warps enter it at the kernel's start: a CTA-wide named
barrier (`BAR.SYNC 0x1`), then each warp loads one byte, its partition's
state, from a small array in shared memory (`LDS.U8 [base + warp id +
offset]`) and branches on it. The default warp group writes that array (all
its worker warps' states at once, e.g. one `STS.64`) right before the same
barrier, once to start the partitions and once more, before the kernel's
return, with the "exit" state. Every write is thus ordered before every read
of the same bytes by that barrier; compute-sanitizer's racecheck nevertheless
reports each worker warp's load as a "Potential RAW hazard" against the
default group's store (H100: each Gluon kernel of the hopper backend; the
reference kernel below, whose partitions touch no shared memory, shows what
the dispatch alone draws).

`dispatch_accesses` finds those instructions in a kernel's SASS (nvdisasm -c);
`is_dispatch_hazard` says whether a racecheck report is between them alone:
each access at a dispatch instruction (the state load, or a store into the
bytes it reads), and, where the report gives the address and threads, the
reader's byte its own warp's state and the writer's byte inside its store.
scripts/sanitize_gpu.py counts such reports apart from the findings.

    python scripts/warp_specialize_dispatch.py [SASS_FILE ...]

prints the dispatch instructions of the reference kernel compiled for sm_90
(no GPU needed) or of the given SASS files (scripts/compile_sm90.py --dump).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# The partitions of the hopper kernels: the default group and workers of 4 and 1 warps (a consumer group and
# the producer), with the forward's registers and cap (forward_specs.HopperForwardSpec).
REFERENCE_PARTITIONS = 3  # the default's and the two workers' (the kernel's list)
REFERENCE_WARPS = 4
REFERENCE_REGISTERS = (240, 24)
REFERENCE_MAX_REGISTERS = 168


@gluon.jit
def _reference_partition(out_ptr, PARTITION: gl.constexpr, PARTITIONS: gl.constexpr):
    """Writes the program id into this partition's slot of global memory; no shared memory."""
    gl.store(out_ptr + gl.program_id(0) * PARTITIONS + PARTITION, gl.program_id(0))


@gluon.jit
def warp_specialize_reference_kernel(out_ptr, CONSUMER_REGISTERS: gl.constexpr, PRODUCER_REGISTERS: gl.constexpr):
    """out[program, partition] = program for the three partitions: only Triton's dispatch touches shared memory."""
    gl.warp_specialize([
        (_reference_partition, (out_ptr, 0, 3)),
        (_reference_partition, (out_ptr, 1, 3)),
        (_reference_partition, (out_ptr, 2, 3)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


def run_reference(device, programs: int = 48) -> None:
    """Launches the reference kernel on `device` and checks every slot (raises AssertionError otherwise)."""
    import torch

    out = torch.full((programs, REFERENCE_PARTITIONS), -1, dtype=torch.int32, device=device)
    with torch.cuda.device(out.device):
        warp_specialize_reference_kernel[(programs,)](
            out, CONSUMER_REGISTERS=REFERENCE_REGISTERS[0], PRODUCER_REGISTERS=REFERENCE_REGISTERS[1],
            num_warps=REFERENCE_WARPS, maxnreg=REFERENCE_MAX_REGISTERS)
    expected = torch.arange(programs, dtype=torch.int32, device=device).view(-1, 1).expand_as(out)
    assert torch.equal(out, expected), f"reference kernel wrote {out.tolist()}"


# ---------------------------------------------------------------- the dispatch's instructions in SASS

INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
BRACKET = re.compile(r"\[([^\]]*)\]")
IMMEDIATE = re.compile(r"-?0x[0-9a-f]+|-?\d+")
STORE_BYTES = {"STS": 4, "STS.U8": 1, "STS.S8": 1, "STS.U16": 2, "STS.S16": 2, "STS.64": 8, "STS.128": 16}
# A hazard's shared address is the window's (reserved shared memory first) plus the kernel's offset; the
# window starts at a multiple of this.
WINDOW_ALIGNMENT = 1024


@dataclasses.dataclass(frozen=True)
class StateStore:
    pc: int
    offset: int  # the store's first byte (kernel shared-memory offset)
    width: int  # bytes


@dataclasses.dataclass(frozen=True)
class DispatchAccesses:
    """The switch loop's state load (worker warp w reads byte `load_offset + w`) and the stores into it."""

    load_pc: int
    load_offset: int
    stores: tuple[StateStore, ...]

    def store_at(self, pc: int) -> StateStore | None:
        return next((store for store in self.stores if store.pc == pc), None)


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(pc, opcode with its modifiers, operands) of each instruction of one kernel's nvdisasm -c listing."""
    return [(int(pc, 16), opcode, operands.strip()) for pc, opcode, operands in INSTRUCTION.findall(sass)]


def address_offset(operands: str) -> int | None:
    """The immediate of a shared-memory address operand ("[R5+UR39+0x14134]", "[R0+UR4+-0x4]", "[UR4]": 0)."""
    found = BRACKET.search(operands)
    if found is None:
        return None
    last = found.group(1).split("+")[-1]
    return int(last, 0) if IMMEDIATE.fullmatch(last) else 0


def dispatch_accesses(sass: str, total_warps: int) -> DispatchAccesses | None:
    """The dispatch's state load and stores in one kernel's SASS, or None where it has no switch loop.

    The load is the first LDS.U8 after the kernel's first CTA-wide `BAR.SYNC 0x1` and before its branch on
    the state (BRX); the stores are the STS instructions whose bytes lie in the state array, the bytes the
    load reads for warps 1 to `total_warps` - 1 (the default group holds warp 0)."""
    listing = instructions(sass)
    barrier = next((i for i, (_, opcode, operands) in enumerate(listing)
                    if opcode.startswith("BAR.SYNC") and operands == "0x1"), None)
    if barrier is None:
        return None
    load = None
    for pc, opcode, operands in listing[barrier + 1:]:
        if opcode.startswith("BRX"):
            break
        if opcode == "LDS.U8":
            load = (pc, address_offset(operands))
            break
    if load is None or load[1] is None:
        return None
    load_pc, load_offset = load
    stores = []
    for pc, opcode, operands in listing:
        width = STORE_BYTES.get(opcode)
        offset = address_offset(operands) if width else None
        if offset is not None and load_offset < offset and offset + width <= load_offset + total_warps:
            stores.append(StateStore(pc, offset, width))
    return DispatchAccesses(load_pc, load_offset, tuple(stores))


@dataclasses.dataclass(frozen=True)
class Access:
    """One side of a racecheck report: "Write"/"Read", the thread's x index (None where the report gives no
    thread), the kernel and the instruction's offset in it."""

    kind: str
    thread: int | None
    kernel: str
    pc: int


ACCESS = re.compile(r"(Write|Read) (?:Thread \((\d+),\d+,\d+\) |access )at (?:0x[0-9a-f]+ in )?"
                    r"([A-Za-z_][\w]*)(?:\([^)]*\))?\+0x([0-9a-f]+)")
SHARED_ADDRESS = re.compile(r"at __shared__ (0x[0-9a-f]+)")


def parse_accesses(lines: list[str]) -> tuple[int | None, list[Access]]:
    """The shared address (None where not given) and the accesses of one racecheck report's lines."""
    address = next((int(found.group(1), 16) for line in lines for found in [SHARED_ADDRESS.search(line)] if found),
                   None)
    accesses = [Access(found.group(1), None if found.group(2) is None else int(found.group(2)), found.group(3),
                       int(found.group(4), 16))
                for line in lines for found in ACCESS.finditer(line)]  # fmt: skip
    return address, accesses


def is_dispatch_hazard(address: int | None, accesses: list[Access], dispatch: DispatchAccesses,
                       threads_per_warp: int = 32) -> bool:
    """Whether a racecheck report (its shared address and accesses) lies between the dispatch's own accesses:
    every read the state load, every write a state store, and where the report gives the address, one window
    base (a multiple of WINDOW_ALIGNMENT) puts each reader on its own warp's byte and each writer inside its
    store."""
    if not accesses:
        return False
    windows = set()
    for access in accesses:
        if access.kind == "Read":
            if access.pc != dispatch.load_pc:
                return False
            if address is not None and access.thread is not None:
                windows.add(address - dispatch.load_offset - access.thread // threads_per_warp)
        else:
            store = dispatch.store_at(access.pc)
            if store is None:
                return False
            if address is not None:
                into = (address - store.offset) % WINDOW_ALIGNMENT
                if into >= store.width:
                    return False
                windows.add(address - store.offset - into)
    return all(window % WINDOW_ALIGNMENT == 0 for window in windows) and len(windows) <= 1


# ---------------------------------------------------------------- cubins: Triton's cache, or an sm_90 compile


def nvdisasm_path() -> str:
    from triton import knobs

    return knobs.nvidia.nvdisasm.path


def sass_of_cubin(cubin: Path) -> str:
    return subprocess.run([nvdisasm_path(), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout


def cached_dispatch(kernel: str, cache_dir: str | None = None) -> list[DispatchAccesses]:
    """The dispatch accesses of every compiled variant of `kernel` in Triton's cache (each directory of the
    cache holds one compile: `<kernel>.cubin` and its metadata `<kernel>.json`, whose num_warps counts every
    partition's warps)."""
    from triton import knobs

    found = []
    for cubin in sorted(Path(cache_dir or knobs.cache.dir).glob(f"*/{kernel}.cubin")):
        metadata = cubin.with_suffix(".json")
        total_warps = json.loads(metadata.read_text()).get("num_warps", 32) if metadata.exists() else 32
        accesses = dispatch_accesses(sass_of_cubin(cubin), total_warps)
        if accesses is not None:
            found.append(accesses)
    return found


def compile_reference_sm90():
    """The reference kernel compiled for sm_90 (Triton's bundled ptxas; no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    target = GPUTarget("cuda", 90, 32)
    kernel = warp_specialize_reference_kernel
    signature = {"out_ptr": "*i32", "CONSUMER_REGISTERS": "constexpr", "PRODUCER_REGISTERS": "constexpr"}
    constexprs = {(1,): REFERENCE_REGISTERS[0], (2,): REFERENCE_REGISTERS[1]}
    source = GluonASTSource(kernel, signature, constexprs, {(0,): [["tt.divisibility", 16]]})
    return triton.compile(source, target=target,
                          options=dict(num_warps=REFERENCE_WARPS, maxnreg=REFERENCE_MAX_REGISTERS))


def describe(accesses: DispatchAccesses | None) -> str:
    if accesses is None:
        return "no warp-specialize switch loop"
    stores = ", ".join(f"+{s.pc:#x} ({s.width} B at {s.offset:#x})" for s in accesses.stores)
    return f"state load +{accesses.load_pc:#x} (byte {accesses.load_offset:#x} + warp id); stores {stores}"


def main(paths: list[str]) -> int:
    if not paths:
        kernel = compile_reference_sm90()
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp, "reference.cubin")
            cubin.write_bytes(kernel.asm["cubin"])
            sass = sass_of_cubin(cubin)
        print(f"reference kernel (sm_90, {kernel.metadata.num_warps} warps): "
              f"{describe(dispatch_accesses(sass, kernel.metadata.num_warps))}")
        return 0
    for path in paths:
        print(f"{path}: {describe(dispatch_accesses(Path(path).read_text(), 32))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
