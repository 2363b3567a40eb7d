"""``torchrun ... tests/train/torchrun_entry.py JOB.json RESULTS``: the scenarios of
`distributed_harness` (`launch.py run` command lines, some with a rank made to fail) run one
after another under the real launcher; the exit status is the last scenario's.

JOB.json holds ``{"scenarios": [...], "ports": [...]}``: each scenario meets at its own port
with its own store (as the spawned sessions do), not at the launcher's store: a process group
made again on the same store would find the keys of the one before.
"""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    from tests.train.distributed_harness import run_scenarios

    job = json.loads(Path(sys.argv[1]).read_text())
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    sys.exit(run_scenarios(int(os.environ["RANK"]), job["scenarios"], sys.argv[2], job["ports"]))
