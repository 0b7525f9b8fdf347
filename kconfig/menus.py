"""kconfiglib's menus (menuconfig, guiconfig) on a tree whose float symbols' help says their type and range.

Kconfig has no float type: a float is a string symbol whose prompt ends in "(float LO..HI)", so the
menus' help screens ('?' in menuconfig, the info pane in guiconfig) say "Type: string". Before a
menu starts, each float symbol's help gets one more paragraph: "Type: float within [LO, HI]" or
"Type: comma-separated floats, each within [LO, HI]". Help text is not part of .config, so what the
menu saves is unchanged; the strict check after it (kbuild syncconfig) still validates the value.

    python -m kconfig.menus menuconfig Kconfig    (make menuconfig, make nconfig)
    python -m kconfig.menus guiconfig Kconfig     (make guiconfig)
"""

from __future__ import annotations

import math
import sys
import textwrap

import kconfiglib

from kconfig.values import FloatSpec, float_spec

TOOLS = ("menuconfig", "guiconfig")


def float_help(spec: FloatSpec) -> str:
    """The paragraph a float symbol's help ends with: its type and range, as the strict check reads them."""
    bounded = not (math.isinf(spec.lo) and math.isinf(spec.hi))
    within = f"within [{spec.lo:g}, {spec.hi:g}]" if bounded else "(any finite value)"
    if spec.is_list:
        text = f"Type: comma-separated floats, each {within} (a Kconfig string: type numbers such as 1e-3,3e-3)"
    else:
        text = f"Type: float {within} (a Kconfig string: type a number such as 3e-4)"
    return textwrap.fill(text, width=68, break_on_hyphens=False)  # the width of the help texts around it


def annotate_float_help(kconf: kconfiglib.Kconfig) -> int:
    """Append float_help to the help of every float symbol's prompted definitions; how many symbols.

    Idempotent: a help text that already ends with the paragraph is left as it is. The menus' listing
    of a symbol's definition (its help included) shows the paragraph too.
    """
    count = 0
    for sym in kconf.unique_defined_syms:
        spec = float_spec(sym)
        if spec is None:
            continue
        line = float_help(spec)
        for node in sym.nodes:
            if node.prompt and not (node.help or "").endswith(line):
                node.help = f"{node.help.rstrip()}\n\n{line}" if node.help else line
        count += 1
    return count


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in TOOLS:
        print(f"usage: python -m kconfig.menus {{{'|'.join(TOOLS)}}} [KCONFIG]", file=sys.stderr)
        return 2
    # The file KCONFIG_CONFIG names is the one the menu loads and saves (kconfiglib reads the variable).
    kconf = kconfiglib.Kconfig(argv[1] if len(argv) == 2 else "Kconfig", suppress_traceback=True)
    annotate_float_help(kconf)
    if argv[0] == "menuconfig":
        import menuconfig as tool  # curses: imported only when this menu runs
    else:
        import guiconfig as tool  # tkinter, likewise
    tool.menuconfig(kconf)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
