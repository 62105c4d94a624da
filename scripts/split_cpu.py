"""Split the one-file CPU kernels (``ember/kernels/cpu.cpp``) into translation units and headers of ~600 lines.

Usage: ``python scripts/split_cpu.py [--input PATH] [--check]``: reads the one-file ``cpu.cpp`` (default
``ember/kernels/cpu.cpp``; after a split that file is one of the outputs, so pass the unsplit text with
``--input``, e.g. ``git show <rev>:ember/kernels/cpu.cpp > /tmp/cpu_full.cpp``) and writes the units into
``ember/kernels/``. ``--check`` writes nothing and only reports the units and their line counts.

The cuts are found by name (section comments, function and struct names), never by line number, and each must
fall at the top level (no open function, struct or ``#if``), else the script stops. Every input line lands in
exactly one output, except: the ``File layout`` comment of the header (replaced by the list of units), and the
shared C-level declarations (the ``*Desc`` structs and the prototypes of functions defined elsewhere), which
move into ``cpu_api.h`` beside generated prototypes of every ``extern "C"`` function defined here. Anonymous
namespaces, ``extern "C"`` blocks and ``#if`` blocks open at a cut are closed before it and reopened after it
(a cut past an open ``#if``'s ``#else`` is refused), and runs of blank lines become one.
"""

from __future__ import annotations

import argparse
import re
import textwrap
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "ember" / "kernels"


def section(title: str) -> str:
    return r"// =+ " + re.escape(title) + r"$"


def func(name: str) -> str:
    return r"^[A-Za-z_].*\b" + re.escape(name) + r"\("


# Cuts, in input order: (pattern of the named line, output the lines from the cut on go to). Each cut starts at
# its named line, moved up over the comments, template / #if lines and one namespace / extern "C" opening right
# above it, so that a function keeps its comment and a section its guard.
CUTS = [
    (None, "cpu_base.h"),
    (section("AVX2 + FMA (no AVX512)"), "cpu_avx2.h"),
    (section("dense bf16"), "cpu_avx512.h"),
    (section("int8 activations (VNNI)"), "cpu_vnni.h"),
    (section("dense bf16 on AMX tiles"), "cpu.cpp"),
    (section("activation preparation and job runners"), "cpu_jobs.h"),
    (section("entry points: int8 and 4-bit products, dequantization"), "cpu_quant.cpp"),
    (r"^void rms_norm_row\(.*\);$", "cpu.cpp"),
    (section("single-query attention"), "cpu_attn.cpp"),
    (r"^inline float to_float\(T v\);$", "cpu_norms.h"),
    (r"^// Heads h0\.\.h1-1 of batch row b", "cpu_attn.cpp"),
    (r"^inline __m512 load16f\(const float\* p\)", "cpu_norms.h", "pp"),
    (func("exp16_nonpos"), "cpu_attn.cpp"),
    (section("prepared linear calls"), "cpu_linear.cpp"),
    (func("add_bias"), "cpu_linear.h"),
    (func("ember_gguf_linear"), "cpu_linear.cpp"),
    (section("decoder blocks for one token"), "cpu_blocks.cpp"),
    (func("round_to_dtype"), "cpu_norms.h"),
    (func("ember_softcap_attn"), "cpu_blocks.cpp"),
    (section("decode steps of several rows"), "cpu_rows.cpp"),
]

# The C-level structs the units share (ctypes mirrors them); they move into cpu_api.h with their comments.
SHARED_STRUCTS = ["LinearDesc", "AttnBlockDesc", "MlpBlockDesc", "MoeBlockDesc", "LayerStepDesc", "MlaDesc"]

# What each output holds (its top comment) and what it includes, in order.
UNITS = {
    "cpu_base.h": ("Shared by the matmul kernels: block sizes, row pointers, per-thread scratch.", ["common.h"]),
    "cpu_avx2.h": ("AVX2 + FMA row kernels (no AVX512): dense, int8 activations, 4-bit.", ["cpu_base.h"]),
    "cpu_avx512.h": ("AVX512 row kernels per weight format: dense bf16, dense fp32, int8, 4-bit.", ["cpu_avx2.h"]),
    "cpu_vnni.h": ("int8-activation kernels (AVX512-VNNI) for int8 and 4-bit weights, the AVX2 fp32 4-bit kernel, "
                   "and the row-block runners.", ["cpu_avx512.h"]),
    "cpu_jobs.h": ("Activation preparation and job runners: one quantized activation row shared by several "
                   "weights.", ["cpu_vnni.h"]),
    "cpu_linear.h": ("Helpers of the prepared linear calls: bias, grouping of weights into one job call, the "
                     "exact several-row dense kernel.", ["cpu_jobs.h", "cpu_api.h"]),
    "cpu_norms.h": ("Element-wise helpers of the decoder blocks: dtype rounding, exp, RMSNorm / RoPE rows, "
                    "SiLU / GELU products, soft-capping.", ["common.h", "cpu_api.h"]),
    "cpu_api.h": ("The C-level surface the units share: the prepared-weight and block descriptors (ctypes "
                  "mirrors them) and the extern \"C\" functions.", ["common.h"]),
    "cpu.cpp": ("Kernel build queries, dense products (AVX512, AVX2, AMX tiles), RMSNorm and RoPE entry points. "
                "The overview of the kernels is in cpu_base.h.", ["cpu_vnni.h", "cpu_norms.h", "cpu_api.h"]),
    "cpu_quant.cpp": ("Entry points of the int8 and 4-bit products and their dequantization.",
                      ["cpu_jobs.h", "cpu_api.h"]),
    "cpu_attn.cpp": ("Single-query attention (ember_attn_decode).", ["cpu_base.h", "cpu_norms.h", "cpu_api.h"]),
    "cpu_linear.cpp": ("Prepared linear calls: ember_linear, ember_linear_many, ember_linear_rows.",
                       ["cpu_linear.h"]),
    "cpu_blocks.cpp": ("Decoder blocks for one token: attention, MLP and mixture-of-experts blocks, every layer of "
                       "a step in one call.", ["cpu_linear.h", "cpu_norms.h"]),
    "cpu_rows.cpp": ("Decode steps of several rows (speculative verification passes).",
                     ["cpu_linear.h", "cpu_norms.h"]),
}
NOTE = "// Cut from the one-file kernels by scripts/split_cpu.py."


class SplitError(RuntimeError):
    pass


def is_section(line: str) -> bool:
    return line.startswith("// ====")


def code_braces(line: str) -> int:
    """Net { minus } of a line's code (comments and literals left out)."""
    code = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    code = re.sub(r"'(\\.|[^'\\])*'", "''", code)
    code = code.split("//", 1)[0]
    return code.count("{") - code.count("}")


def scan(lines: list[str]) -> list[tuple[int, tuple[str, ...], bool]]:
    """Per line, the state before it: (brace depth outside namespaces / extern "C", the namespace, extern "C" and
    #if lines open there (outermost first), whether an open #if has passed its #else)."""
    state, depth, opens = [], 0, []  # opens: [kind, line, brace depth inside or -1, #else seen]
    for ln in lines:
        nb = sum(1 for o in opens if o[2] >= 0)
        state.append((depth - nb, tuple(o[1] for o in opens), any(o[3] for o in opens)))
        s = ln.strip()
        if s.startswith("#if"):
            opens.append(["pp", ln, -1, False])
        elif s.startswith(("#else", "#elif")):
            next(o for o in reversed(opens) if o[0] == "pp")[3] = True
        elif s.startswith("#endif"):
            k = max(i for i, o in enumerate(opens) if o[0] == "pp")
            del opens[k]
        if depth == nb and ln in ("namespace {", 'extern "C" {'):
            opens.append(["block", ln, depth + 1, False])
        depth += code_braces(ln)
        while opens and opens[-1][2] >= 0 and depth < opens[-1][2]:
            opens.pop()
    state.append((depth, tuple(o[1] for o in opens), False))
    if depth or opens:
        raise SplitError(f"unbalanced input: brace depth {depth}, open {opens}")
    return state


def closing(line: str) -> str:
    if line.startswith("#"):
        return "#endif"
    return "}  // namespace" if line.startswith("namespace") else '}  // extern "C"'


def walk_back(lines: list[str], i: int, pp_only: bool = False) -> int:
    """Move a cut up over the comments, template and #if lines, and one block opening right above line i (with
    pp_only, over #if lines only)."""
    while i > 0:
        p = lines[i - 1]
        if pp_only:
            if not p.startswith("#if"):
                break
            i -= 1
            continue
        if p.startswith("#if") or p.startswith("template") or (p.startswith("//") and not is_section(p)):
            i -= 1
        elif p in ("namespace {", 'extern "C" {'):
            return i - 1
        else:
            break
    j = i  # a block opening a few blank lines up goes with the cut too
    while j > 0 and lines[j - 1] == "":
        j -= 1
    return j - 1 if j > 0 and lines[j - 1] in ("namespace {", 'extern "C" {') else i


def find_one(lines: list[str], pattern: str, what: str) -> int:
    hits = [i for i, ln in enumerate(lines) if re.search(pattern, ln)]
    if len(hits) != 1:
        raise SplitError(f"{what}: pattern {pattern!r} matches {len(hits)} lines of cpu.cpp (want exactly 1): "
                         "update CUTS / SHARED_STRUCTS in scripts/split_cpu.py")
    return hits[0]


def statement_end(lines: list[str], i: int) -> tuple[int, str]:
    """The line where the statement starting at i reaches '{' or ';' (the first found), and which."""
    for j in range(i, len(lines)):
        code = lines[j].split("//", 1)[0]
        for ch in code:
            if ch in "{;":
                return j, ch
    raise SplitError(f"line {i + 1}: statement never ends")


def split(text: str) -> dict[str, list[str]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    state = scan(lines)
    owner: list[str | None] = [None] * len(lines)

    # The File layout comment of the header: replaced by the list of units.
    lay = find_one(lines, r"^// File layout", "File layout comment")
    lay_end = lay
    while lay_end < len(lines) and lines[lay_end].startswith("//"):
        lay_end += 1
    for i in range(lay, lay_end):
        owner[i] = "-"

    # Shared structs and the prototypes of functions defined in other units -> cpu_api.h.
    api_moved: list[int] = []
    moved_protos: list[int] = []
    for name in SHARED_STRUCTS:
        i = find_one(lines, rf"^struct {name}\b", f"struct {name}")
        if state[i][0] != 0 or state[i][1]:
            raise SplitError(f"struct {name} (line {i + 1}) is not at the top level")
        j, ch = statement_end(lines, i)
        if ch == "{":
            j = i
            while lines[j] != "};":
                j += 1
        k = i
        while k > 0 and lines[k - 1].startswith("//") and not is_section(lines[k - 1]):
            k -= 1
        api_moved += range(k, j + 1)
    protos: list[str] = []
    extern_fn = re.compile(r"^[A-Za-z_][\w\s\*]*\b(ember_\w+)\(")
    for i, ln in enumerate(lines):
        m = extern_fn.match(ln)
        if not m or state[i][1] != ('extern "C" {',) or state[i][0] != 0:
            continue
        j, ch = statement_end(lines, i)
        if ch == ";":
            moved_protos += range(i, j + 1)
        else:
            sig = lines[i:j + 1]
            sig[-1] = sig[-1].split("{", 1)[0].rstrip() + ";"
            protos += sig
    for i in api_moved + moved_protos:
        if owner[i] is not None:
            raise SplitError(f"line {i + 1} claimed twice")
        owner[i] = "cpu_api.h"

    # The named cuts.
    starts = []
    for pattern, unit, *mode in CUTS:
        pp_only = mode == ["pp"]
        if pattern is None:
            starts.append((0, unit))
            continue
        i = walk_back(lines, find_one(lines, pattern, f"cut before {unit}"), pp_only)
        depth, _, else_seen = state[i]
        if depth or else_seen:
            raise SplitError(f"cut for {unit} at line {i + 1} ({lines[i]!r}) is not at the top level "
                             f"(inside a function or struct, or past an open #if's #else)")
        starts.append((i, unit))
    if [s for s, _ in starts] != sorted(s for s, _ in starts) or len({s for s, _ in starts}) != len(starts):
        raise SplitError(f"cuts out of order: {[(s + 1, u) for s, u in starts]}")

    out: dict[str, list[str]] = {u: [] for u in UNITS}
    open_at_end: dict[str, tuple[str, ...]] = {u: () for u in UNITS}  # what each output leaves open so far
    bounds = [s for s, _ in starts] + [len(lines)]
    for (a, unit), b in zip(starts, bounds[1:]):
        seg = [i for i in range(a, b) if owner[i] is None]
        for i in seg:
            owner[i] = unit
        if not seg:
            continue
        body, prev, now = out[unit], open_at_end[unit], state[a][1]
        common = 0
        while common < min(len(prev), len(now)) and prev[common] == now[common]:
            common += 1
        body += [closing(x) for x in reversed(prev[common:])] + list(now[common:])
        body += [lines[i] for i in seg]
        open_at_end[unit] = state[b][1]
    for unit, left in open_at_end.items():
        out[unit] += [closing(x) for x in reversed(left)]
    missing = [i + 1 for i, o in enumerate(owner) if o is None]
    if missing:
        raise SplitError(f"lines not placed: {missing[:10]}")

    api = out["cpu_api.h"]
    api += [lines[i] for i in sorted(api_moved)]
    api += ["", 'extern "C" {', "", "// defined in the cpu_* units (their signatures, generated)"] + protos
    api += ["", "// defined in the other units"]
    api += [lines[i] for i in moved_protos] + ["", '}  // extern "C"']

    layout = ["// File layout (one library: every *.cpp here compiles into it; the headers hold what several share):"]
    for u in UNITS:
        text = textwrap.wrap(UNITS[u][0], 96)
        layout += [f"//   {u:<16}{text[0]}"] + [f"//   {'':<16}{t}" for t in text[1:]]
    base_head = out["cpu_base.h"]
    base_head = base_head[:lay] + layout + base_head[lay:]
    inc = next(i for i, ln in enumerate(base_head) if ln.startswith("#include"))
    out["cpu_base.h"] = base_head[:inc] + ["#pragma once", ""] + base_head[inc:]

    files = {}
    for unit, body in out.items():
        desc, incs = UNITS[unit]
        head = [] if unit == "cpu_base.h" else [f"// {t}" for t in textwrap.wrap(desc, 112)] + [NOTE, ""]
        if unit.endswith(".h"):
            head += ["#pragma once", ""]
        head += [f'#include "{h}"' for h in incs if not (unit == "cpu_base.h" and h == "common.h")]
        text = head + ([""] if head and head[-1] else []) + body
        # runs of blank lines (where a moved declaration or a cut left two) become one
        files[unit] = [ln for k, ln in enumerate(text) if ln or k == 0 or text[k - 1]]
    # every input line exactly once (moved or kept), the layout comment excepted
    placed = sorted(i for i, o in enumerate(owner) if o != "-")
    if len(placed) != len(set(placed)) or len(placed) + (lay_end - lay) != len(lines):
        raise SplitError("line accounting failed")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=KDIR / "cpu.cpp")
    ap.add_argument("--check", action="store_true", help="report the units, write nothing")
    args = ap.parse_args()
    text = args.input.read_text()
    if NOTE in text:
        print(f"split_cpu.py: {args.input} is already one of the split units; pass the one-file text with --input "
              "(e.g. git show <rev>:ember/kernels/cpu.cpp > /tmp/cpu_full.cpp)", file=sys.stderr)
        return 1
    try:
        files = split(text)
    except SplitError as e:
        print(f"split_cpu.py: {e}", file=sys.stderr)
        return 1
    for unit, body in files.items():
        print(f"{len(body):5d}  ember/kernels/{unit}")
        if not args.check:
            (KDIR / unit).write_text("\n".join(body) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
