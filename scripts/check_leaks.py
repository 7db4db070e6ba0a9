"""Read ASan/UBSan logs; fail on any error report and on leaks allocated under vramguard.

The interpreter and NumPy leave objects behind at exit on purpose; those stacks never pass
through our extension, so a leak counts as ours exactly when one of its frames does.
"""
import pathlib
import re
import sys

OURS = re.compile(r"vramguard/_native|\bcsrc/\w+\.c:")


def main(logdir: str) -> int:
    bad = 0
    leaks_ours = leaks_other = 0
    for f in sorted(pathlib.Path(logdir).glob("*")):
        text = f.read_text(errors="replace")
        for m in re.finditer(r"ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer)[^\n]*", text):
            if "detected memory leaks" not in m.group(0):
                print(f"{f.name}: {m.group(0)}")
                bad = 1
        if "runtime error:" in text:
            print(f"{f.name}: UBSan runtime error:\n" + "\n".join(
                line for line in text.splitlines() if "runtime error" in line))
            bad = 1
        for block in re.split(r"\n(?=(?:Direct|Indirect) leak of)", text):
            if not re.match(r"(Direct|Indirect) leak of", block):
                continue
            if OURS.search(block):
                leaks_ours += 1
                print(f"{f.name}: leak in vramguard:\n{block[:3000]}")
            else:
                leaks_other += 1
    print(f"sanitizers: {'errors found' if bad else 'no errors'}; leaks under vramguard: {leaks_ours}; "
          f"interpreter/NumPy exit-time leaks ignored: {leaks_other}")
    return 1 if bad or leaks_ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
