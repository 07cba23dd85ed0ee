"""python -m bench.definitions [STEPS...]: how long `flowdb validate` takes on big definitions.

For each size (default 1,000 and 10,000 steps) it writes a chain (each step reads the one before
it, the last one also reads the first) and a fan (one step, STEPS - 2 in parallel reading it, one
reading them), runs the real `flowdb validate` on each and prints the wall time and the CPU time
of the process, both including the command's start-up (about a second). On a shared machine the CPU
time is the steadier figure.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def chain(steps: int, *, cycle: bool = False, name: str | None = None) -> str:
    """s0 -> s1 -> ... -> s{steps-1}; each message reads the step before, the last one also reads s0.

    With `cycle`, s0 depends on the last step (line 8, column 20 of the text)."""
    lines = ["process:", f"  name: {name or f'chain-{steps}'}", "  steps:"]
    for i in range(steps):
        lines += [f"    - id: s{i}", "      type: agent_task", "      agent: writer"]
        if i == 0:
            lines.append('      message: "Start"')
            if cycle:
                lines.append(f"      depends_on: [s{steps - 1}]")
            continue
        first = " and {{ steps.s0.output }}" if i == steps - 1 else ""
        lines += [f'      message: "Go on from {{{{ steps.s{i - 1}.output }}}}{first}"',
                  f"      depends_on: [s{i - 1}]"]
    return "\n".join(lines) + "\n"


def fan(steps: int, name: str | None = None) -> str:
    """start -> w0 .. w{steps-3} -> end: a wide fan-out and one fan-in of steps - 2 parents."""
    workers = [f"w{i}" for i in range(steps - 2)]
    lines = ["process:", f"  name: {name or f'fan-{steps}'}", "  steps:",
             "    - id: start", "      type: agent_task", "      agent: writer", '      message: "Start"']
    for worker in workers:
        lines += [f"    - id: {worker}", "      type: agent_task", "      agent: writer", "      depends_on: [start]",
                  f'      message: "Part {worker} of {{{{ steps.start.output }}}}"']
    lines += ["    - id: end", "      type: agent_task", "      agent: writer",
              f"      depends_on: [{', '.join(workers)}]",
              f'      message: "All of {{{{ steps.{workers[0]}.output }}}} to {{{{ steps.{workers[-1]}.output }}}}"']
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    sizes = [int(arg) for arg in argv] or [1000, 10_000]
    exe = shutil.which("flowdb", path=str(Path(sys.executable).parent)) or "flowdb"
    with tempfile.TemporaryDirectory() as folder:
        for steps in sizes:
            for shape in (chain, fan):
                path = Path(folder) / f"{shape.__name__}-{steps}.yaml"
                path.write_text(shape(steps), encoding="utf-8")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                began = time.monotonic()
                result = subprocess.run([exe, "validate", str(path)], capture_output=True, text=True)
                seconds = time.monotonic() - began
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                outcome = "ok" if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1][:100]
                print(f"{shape.__name__:>5} {steps:>6} steps ({path.stat().st_size / 1e6:.2f} MB): "
                      f"{seconds:6.2f} s wall, {cpu:6.2f} s CPU  {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
