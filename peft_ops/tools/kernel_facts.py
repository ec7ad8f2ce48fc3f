"""What decides a kernel's speed, read from its compiled PTX and ptxas' resource report.

No GPU needed: every fact here comes from a build for a named target (``peft-ops compile``).

- Loops: every innermost loop of the PTX (a label and the branch back to it), named by the
  source line of its ``for`` (the ``.loc`` at the back edge). *Main loops* are the loops over
  a problem dimension (K, N, d, rows); a loop that steps by ``BLOCK_R`` runs over the LoRA
  rank chunks (once for r ≤ BLOCK_R) and is counted apart.
- Per iteration of each loop, per CTA (every instruction runs in every warp; a ``wgmma`` in
  every warpgroup): tensor-core instructions by shape and their FLOPs; global loads and stores
  by width (``ld.global`` 8 … 128 bits), ``cp.async`` by size, TMA (``cp.async.bulk.tensor``)
  copies; bytes moved; shared-memory traffic (``ld/st.shared``, ``ldmatrix``, and the operands
  ``wgmma`` reads from shared memory); *gathers*: loads whose global address depends on a
  value the kernel loaded (a data-dependent lookup: a table indexed by a loaded byte, say).
- Occupancy: CTAs per SM from registers, shared memory and warps, and which one limits.
"""

from __future__ import annotations

import dataclasses
import functools
import re

# Per-SM limits of the targets (CUDA programming guide, compute capabilities 8.0 and 9.0).
SM_LIMITS = {
    "sm80": {"registers": 65536, "warps": 64, "ctas": 32, "shared_bytes": 167936, "reserved_shared_per_cta": 1024},
    "sm90": {"registers": 65536, "warps": 64, "ctas": 32, "shared_bytes": 233472, "reserved_shared_per_cta": 1024},
}
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in blocks of 256
SM_PARTITIONS = 4  # each holds a quarter of the register file and schedules its own warps


def occupancy(target: str, registers: int, num_warps: int, shared_bytes: int) -> dict:
    """CTAs resident per SM and the resource that limits them ("registers", "shared memory",
    "warps" or "CTA slots")."""
    limits = SM_LIMITS[target]
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps_by_registers = (limits["registers"] // SM_PARTITIONS // max(per_warp, 1)) * SM_PARTITIONS
    bounds = {
        "registers": warps_by_registers // num_warps,
        "shared memory": limits["shared_bytes"] // (shared_bytes + limits["reserved_shared_per_cta"]),
        "warps": limits["warps"] // num_warps,
        "CTA slots": limits["ctas"],
    }
    limiter = min(bounds, key=bounds.get)
    return {"ctas_per_sm": bounds[limiter], "limited_by": limiter, "warps_per_sm": bounds[limiter] * num_warps}


# --------------------------------------------------------------------------------------
# PTX reading
# --------------------------------------------------------------------------------------

_REGISTER = re.compile(r"%[a-z]+[0-9]+")
_LABEL = re.compile(r"^(\$?[A-Za-z_][\w$]*):")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_WIDTH = re.compile(r"\.(?:b|u|s|f)(8|16|32|64)\b")
_VECTOR = re.compile(r"\.v(2|4|8)\b")


@dataclasses.dataclass
class Instruction:
    index: int  # position among the function's instructions
    opcode: str  # "ld.global.v4.b32", "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", …
    operands: list[str]
    loc: tuple[int, int] | None  # (file index, source line) of the last .loc before it

    @property
    def destinations(self) -> list[str]:
        """Registers written: the first operand's, unless it is a memory operand (stores, copies)."""
        if not self.operands or self.operands[0].startswith("[") or self.opcode.startswith(
                ("st.", "cp.", "bar", "bra", "red.", "prefetch", "fence", "wgmma.fence", "wgmma.commit",
                 "stmatrix", "ret", "exit", "trap")):
            return []
        return _REGISTER.findall(self.operands[0])

    @property
    def sources(self) -> list[str]:
        start = 0 if self.opcode.startswith("wgmma.mma_async") or not self.destinations else 1
        return [r for op in self.operands[start:] for r in _REGISTER.findall(op)]

    def address_registers(self, which: int = 0) -> list[str]:
        """Registers in the `which`-th memory operand ([…])."""
        memory = [op for op in self.operands if op.startswith("[")]
        return _REGISTER.findall(memory[which]) if len(memory) > which else []


def _split_operands(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


@dataclasses.dataclass
class Function:
    instructions: list[Instruction]
    labels: dict[str, int]  # label → index of the first instruction after it
    branches: list[tuple[int, str]]  # (index of the branch, target label)
    files: dict[int, str]


def parse(ptx: str) -> Function:
    """The instructions of the (single) kernel in `ptx`, with labels, branches and .loc lines."""
    instructions, labels, branches, files = [], {}, [], {}
    loc = None
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        file_match = _FILE.match(raw)
        if file_match:
            files[int(file_match.group(1))] = file_match.group(2)
            continue
        loc_match = _LOC.match(raw)
        if loc_match:
            loc = (int(loc_match.group(1)), int(loc_match.group(2)))
            continue
        if not line or line.startswith((".", "{", "}")):
            continue
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        if not line.endswith(";"):
            continue
        line = line[:-1].strip()
        if line.startswith("@"):  # a guard predicate: not an operand
            line = line.split(None, 1)[1] if " " in line else ""
        opcode, _, rest = line.partition(" ")
        if not opcode or opcode.startswith("."):
            continue
        inst = Instruction(len(instructions), opcode, _split_operands(rest), loc)
        instructions.append(inst)
        if opcode.startswith("bra"):
            branches.append((inst.index, inst.operands[0] if inst.operands else ""))
    return Function(instructions, labels, branches, files)


def _is_wait_loop(fn: Function, first: int, last: int) -> bool:
    """A barrier spin (``mbarrier.try_wait`` and its branch back, what a TMA load's consumer
    waits in): part of the loop around it, not a loop of its own."""
    body = fn.instructions[first:last + 1]
    return any(i.opcode.startswith("mbarrier.try_wait") for i in body) and \
        all(i.opcode.startswith(("mbarrier.", "setp", "bra", "selp", "@")) or not i.opcode for i in body)


def loops(fn: Function) -> list[tuple[int, int]]:
    """Innermost loops as (first, last) instruction indices: a branch back to an earlier label
    (barrier spins aside)."""
    found = sorted({(fn.labels[target], at) for at, target in fn.branches
                    if target in fn.labels and fn.labels[target] <= at})
    found = [(a, b) for a, b in found if not _is_wait_loop(fn, a, b)]
    return [(a, b) for a, b in found if not any((c, d) != (a, b) and a <= c and d <= b for c, d in found)]


def loaded_registers(fn: Function) -> set[str]:
    """Registers whose value derives from a value loaded from memory (global or shared), to a
    fixed point over the whole function (loop-carried values included)."""
    tainted: set[str] = set()
    for inst in fn.instructions:
        if inst.opcode.startswith(("ld.global", "ld.shared", "ld.local", "ldmatrix", "ld.volatile")):
            tainted.update(inst.destinations)
    changed = True
    while changed:
        changed = False
        for inst in fn.instructions:
            dests = inst.destinations
            if dests and not tainted.issuperset(dests) and any(r in tainted for r in inst.sources):
                tainted.update(dests)
                changed = True
    return tainted


def _bits(opcode: str) -> int:
    width = _WIDTH.findall(opcode)
    vector = _VECTOR.search(opcode)
    return int(width[-1]) * (int(vector.group(1)) if vector else 1) if width else 0


_MMA_SHAPE = re.compile(r"\.m(\d+)n(\d+)k(\d+)\.")
_MMA_TYPES = {"bf16": "half", "f16": "half", "tf32": "tf32", "e4m3": "fp8", "e5m2": "fp8", "s8": "int8",
              "u8": "int8"}
_OPERAND_BYTES = {"half": 2, "tf32": 4, "fp8": 1, "int8": 1}


def _mma_kind(opcode: str) -> str:
    for part in opcode.split(".")[::-1]:
        if part in _MMA_TYPES:
            return _MMA_TYPES[part]
    return "half"


def iteration_facts(fn: Function, first: int, last: int, num_warps: int, gathered: set[str]) -> dict:
    """What one CTA does per execution of instructions [first, last] (one loop iteration)."""
    threads = 32 * num_warps
    warpgroups = max(1, num_warps // 4)
    tensor_cores: dict[str, int] = {}
    flops = {"half": 0, "tf32": 0, "fp8": 0, "int8": 0}
    ld_global: dict[int, int] = {}
    st_global: dict[int, int] = {}
    cp_async: dict[int, int] = {}
    facts = {"tma_copies": 0, "gathers": 0, "gather_bytes": 0, "global_load_bytes": 0, "async_load_bytes": 0,
             "global_store_bytes": 0, "shared_bytes": 0, "sync_load_gathers": 0}
    for inst in fn.instructions[first:last + 1]:
        op = inst.opcode
        if op.startswith(("wgmma.mma_async", "mma.sync", "mma.sp")):
            shape = _MMA_SHAPE.search(op + ".")
            kind = _mma_kind(op)
            m, n, k = (int(v) for v in shape.groups())
            wgmma = op.startswith("wgmma")
            label = ("wgmma" if wgmma else "mma.sync") + f".m{m}n{n}k{k}.{kind}"
            tensor_cores[label] = tensor_cores.get(label, 0) + 1
            flops[kind] += 2 * m * n * k * (warpgroups if wgmma else num_warps)
            if wgmma:  # operands from shared memory: B always, A unless it comes in registers
                a_from_shared = not inst.operands[1].startswith("{")
                facts["shared_bytes"] += warpgroups * _OPERAND_BYTES[kind] * k * (n + (m if a_from_shared else 0))
        elif op.startswith("ld.global"):
            bits = _bits(op)
            ld_global[bits] = ld_global.get(bits, 0) + 1
            facts["global_load_bytes"] += bits // 8 * threads
            if any(r in gathered for r in inst.address_registers()):
                facts["gathers"] += 1
                facts["sync_load_gathers"] += 1
                facts["gather_bytes"] += bits // 8 * threads
        elif op.startswith("st.global"):
            bits = _bits(op)
            st_global[bits] = st_global.get(bits, 0) + 1
            facts["global_store_bytes"] += bits // 8 * threads
        elif op.startswith("cp.async.bulk.tensor"):
            facts["tma_copies"] += 1
        elif op.startswith("cp.async.") and not op.startswith(("cp.async.commit", "cp.async.wait")):
            size = int(inst.operands[2], 0) if len(inst.operands) > 2 else 0
            cp_async[size] = cp_async.get(size, 0) + 1
            facts["async_load_bytes"] += size * threads
            facts["shared_bytes"] += size * threads
            if any(r in gathered for r in inst.address_registers(1)):
                facts["gathers"] += 1
                facts["gather_bytes"] += size * threads
        elif op.startswith(("ld.shared", "st.shared")):
            facts["shared_bytes"] += _bits(op) // 8 * threads
        elif op.startswith(("ldmatrix", "stmatrix")):
            count = {"x1": 1, "x2": 2, "x4": 4}.get(next((p for p in op.split(".") if p in ("x1", "x2", "x4")), "x1"))
            facts["shared_bytes"] += 128 * count * num_warps  # one 8×8 matrix of 16-bit values = 128 B
    return {"tensor_core_instructions": tensor_cores, "tensor_core_flops": {k: v for k, v in flops.items() if v},
            "ld_global_by_bits": dict(sorted(ld_global.items())), "st_global_by_bits": dict(sorted(st_global.items())),
            "cp_async_by_bytes": dict(sorted(cp_async.items())), **facts,
            "instructions": last - first + 1}


@functools.lru_cache(maxsize=64)
def _source_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _loop_source(fn: Function, first: int, last: int) -> tuple[str, str]:
    """(file:line, source text) of the loop's `for` (or `while`): the .loc of the back edge, or
    else the nearest earlier .loc in the loop that points at such a line."""
    candidates = [fn.instructions[last].loc] + [fn.instructions[i].loc for i in range(last - 1, first - 1, -1)]
    seen = []
    for loc in candidates:
        if loc is None or loc in seen:
            continue
        seen.append(loc)
        path = fn.files.get(loc[0], "?")
        lines = _source_lines(path)
        text = lines[loc[1] - 1].strip() if 0 < loc[1] <= len(lines) else ""
        if text.startswith(("for ", "while ")):
            return f"{path.rsplit('/', 1)[-1]}:{loc[1]}", text
    loc = fn.instructions[last].loc
    return (f"{fn.files.get(loc[0], '?').rsplit('/', 1)[-1]}:{loc[1]}" if loc else "?"), ""


def is_rank_loop(source_text: str) -> bool:
    """A loop over LoRA rank chunks (steps by BLOCK_R): one iteration while r ≤ BLOCK_R."""
    return bool(re.search(r"range\([^)]*\bBLOCK_R\s*\)", source_text))


def ptx_facts(ptx: str, num_warps: int) -> dict:
    """The facts of one build: per innermost loop (source, kind, per-iteration facts), and the
    main loops' sums (the loops over a problem dimension)."""
    fn = parse(ptx)
    gathered = loaded_registers(fn)
    found = []
    for first, last in loops(fn):
        where, text = _loop_source(fn, first, last)
        found.append({"source": where, "for": text, "rank_loop": is_rank_loop(text),
                      **iteration_facts(fn, first, last, num_warps, gathered)})
    whole = iteration_facts(fn, 0, len(fn.instructions) - 1, num_warps, gathered)
    return {"loops": found, "main_loops": [i for i, loop in enumerate(found) if not loop["rank_loop"]],
            "kernel_gathers": whole["gathers"], "tma_copies": whole["tma_copies"],
            "tensor_core_instructions": whole["tensor_core_instructions"],
            "whole_kernel": whole}  # every instruction once: a loopless kernel's one "iteration"


def main_loop_summary(facts: dict) -> dict:
    """The main loops' per-iteration facts added up (a kernel that streams a dimension twice,
    like the bottleneck forward, has two main loops: one iteration here is one of each)."""
    total: dict = {}
    for i in facts["main_loops"]:
        for key, value in facts["loops"][i].items():
            if isinstance(value, dict):
                bucket = total.setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def describe_tensor_cores(instructions: dict) -> str:
    """"wgmma m64n128k16 ×4" style (per iteration), the widest first; "-" without any."""
    if not instructions:
        return "-"

    def parts(name):  # "wgmma.m64n128k16.half" / "mma.sync.m16n8k16.tf32"
        family, shape, kind = name.rsplit(".", 2)
        return family, shape, kind

    ordered = sorted(instructions.items(), key=lambda kv: -int(_MMA_SHAPE.search("." + parts(kv[0])[1] + ".").group(2)))
    return ", ".join(f"{parts(name)[0]} {parts(name)[1]}{' tf32' if parts(name)[2] == 'tf32' else ''} ×{n}"
                     for name, n in ordered)


def describe_widths(by_bits: dict, unit: str = "b") -> str:
    return " ".join(f"{bits}{unit}×{n}" for bits, n in sorted(by_bits.items(), key=lambda kv: int(kv[0]))) or "-"
