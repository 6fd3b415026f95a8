#!/usr/bin/env python3
"""Write the data section of gguf_blocks.c, the i-quant grids, from gguf-py.

    tests/data/venv-gguf/bin/python tools/gguf_tables.py > grids.c
    (then replace gguf_blocks.c from its line "/* ---- data: the i-quant grids" to the end with grids.c)

The i-quant grids come from the pinned gguf-py (gguf==0.19.0, the venv of tests/test_gguf.sh):
each class's grid_hex, read as little-endian 16-bit words, one word per grid point, is exactly
how gguf-py packs them. tests/test_gguf.py checks the result: it decodes blocks that use every
grid entry and every sign pattern and compares with gguf.quants.dequantize.
"""
import sys

from gguf import quants

GRIDS = [  # (C name, gguf-py class, what)
    ("gguf_iq2xxs_grid", quants.IQ2_XXS, "IQ2_XXS: 256 points of 8 coordinates"),
    ("gguf_iq2xs_grid", quants.IQ2_XS, "IQ2_XS: 512 points of 8 coordinates"),
    ("gguf_iq2s_grid", quants.IQ2_S, "IQ2_S: 1024 points of 8 coordinates"),
    ("gguf_iq3xxs_grid", quants.IQ3_XXS, "IQ3_XXS: 256 points of 4 coordinates"),
    ("gguf_iq3s_grid", quants.IQ3_S, "IQ3_S: 512 points of 4 coordinates"),
    ("gguf_iq1s_grid", quants.IQ1_S, "IQ1_S and IQ1_M: 2048 points of 8 coordinates"),
]

HEAD = """\
/* ---- data: the i-quant grids, written by tools/gguf_tables.py from gguf-py 0.19.0 ----
 *
 * Everything from this line to the end of the file is the script's output (tests/test_gguf.py
 * checks it is, and decodes blocks that use every entry against gguf-py).
 *
 * The i-quant grids (llama.cpp's iq2xxs_grid ... iq1s_grid in ggml-common.h) list lattice
 * points: grid index -> 8 coordinates (IQ1, IQ2) or 4 (IQ3). Each point is one 16-bit word
 * of codes into the type's coordinate values, as gguf-py packs them: 2 bits per coordinate
 * in the IQ1 and IQ2 grids (coordinate j = bits 2j..2j+1), 4 bits in the IQ3 grids
 * (coordinate j = bits 4j..4j+3). So IQ2_XXS's word 0x0002 is the point (43, 8, 8, 8, 8, 8,
 * 8, 8), which ggml-common.h writes as 0x080808080808082b. */
"""


def words(cls):
    h = cls.grid_hex
    b = bytes(int(h[i:i + 2], 16) for i in range(0, len(h), 2))
    w = [b[i] | b[i + 1] << 8 for i in range(0, len(b), 2)]
    assert len(w) == cls.grid_shape[0], cls
    return w


def main():
    out = [HEAD]
    for name, cls, what in GRIDS:
        w = words(cls)
        out.append(f"\n/* {what} */\nstatic const uint16_t {name}[{len(w)}] = {{\n")
        for i in range(0, len(w), 12):
            out.append("    " + " ".join(f"0x{x:04x}," for x in w[i:i + 12]) + "\n")
        out.append("};\n")
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
