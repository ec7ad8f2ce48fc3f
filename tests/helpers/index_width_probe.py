"""Run as a script (without TRITON_INTERPRET): build the first build of every kernel for
sm_90a and print, as JSON, the integer width of the first offset added to each pointer
argument in the TTIR — the offset that carries row × stride, the one that can pass 2³¹."""

import collections
import json
import re

from peft_ops.tools import aot


def first_offsets(ttir: str, pointer_args: set[str]) -> dict[str, list[str]]:
    """{pointer argument: widths of the offsets in the addptr ops applied to it directly (or
    to a splat / broadcast of it)}."""
    root, found = {}, collections.defaultdict(set)
    for line in ttir.splitlines():
        m = re.search(r"(%[\w.]+) = tt\.(?:splat|broadcast|expand_dims) (%[\w.]+)", line)
        if m:
            src = m.group(2)
            if src[1:] in pointer_args:
                root[m.group(1)] = (src[1:], True)
            elif src in root:
                root[m.group(1)] = root[src]
            continue
        m = re.search(r"(%[\w.]+) = tt\.addptr (%[\w.]+), %[\w.]+ : [^,]+, (.+?) loc", line)
        if m:
            result, ptr, offset = m.groups()
            base, fresh = (ptr[1:], True) if ptr[1:] in pointer_args else root.get(ptr, (None, False))
            if base:
                root[result] = (base, False)
                if fresh:
                    found[base].add("i64" if "i64" in offset else ("i32" if "i32" in offset else offset))
    return {k: sorted(v) for k, v in found.items()}


def main():
    out, seen = {}, set()
    for module in aot.KERNEL_MODULES:
        for spec in aot.kernel_specs(module, "sm90"):
            kernel = spec.name.split(" [")[0]
            if kernel in seen:
                continue
            seen.add(kernel)
            pointers = {name for name, kind in spec.signature.items() if kind.startswith("*")}
            out[kernel] = first_offsets(spec.build("sm90").asm["ttir"], pointers)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
