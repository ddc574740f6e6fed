"""The real app (app.py's main) with every generation step slowed to `PACED_STEP_S` seconds, so a
test can kill it in the middle of a reply: the demo model writes a reply faster than a client can
watch it. Test-only; the app itself has no such switch.

    PACED_STEP_S=0.05 python tests/paced_app.py --data-dir DIR --port PORT
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rwkv_playground.runtime import Runtime  # noqa: E402

DELAY = float(os.environ.get("PACED_STEP_S", "0"))
_fast_step = Runtime.step


def _paced_step(self, tokens, states, *args, **kwargs):
    time.sleep(DELAY)
    return _fast_step(self, tokens, states, *args, **kwargs)


Runtime.step = _paced_step

import app  # noqa: E402

if __name__ == "__main__":
    sys.exit(app.main(sys.argv[1:]))
