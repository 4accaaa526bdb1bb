"""Print the decode step variants the GPU test tier did not fail, comma-separated, for `bench-decode --step-variants`.

`.ci/gpu-check` runs the GPU tests before the benchmark; a launch variant (PDL, one-launch attention) whose test
failed or errored there (e.g. a device fault) is left out of the benchmark's race so it cannot take the benchmark
down with it. Variants whose test did not run (a stage cut short) stay in: their own check in the race still guards
them. Usage: python3 .ci/step_variants_passed.py JUNIT_XML
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, ".")
from kernels.engine import STEP_VARIANTS  # noqa: E402

TEST = "test_launch_variants_decode_exactly_like_the_plain_fused_step"


def main(path: str) -> int:
    failed: set[str] = set()
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"step_variants_passed: cannot read {path} ({e}); keeping every variant", file=sys.stderr)
        root = None
    for case in root.iter("testcase") if root is not None else ():
        m = re.fullmatch(rf"{TEST}\[(.+)\]", case.get("name", ""))
        if m and (case.find("failure") is not None or case.find("error") is not None):
            failed.add(m.group(1))
    if failed:
        print(f"step_variants_passed: leaving out {sorted(failed)} (failed in the GPU tests)", file=sys.stderr)
    print(",".join(name for name in STEP_VARIANTS if name not in failed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
