"""bench/frame_path.py runs every row it prints, the compiled paths over several calls at once included: each row
checks its own work (every frame went out inside its push), so a run that exits cleanly measured what it says."""

from __future__ import annotations

import subprocess
import sys

import pytest

from telephony_bridge.audio.kernels import use_compiled
from telephony_bridge.inbound import CallerPath
from telephony_bridge.outbound import AiAudioPath
from telephony_bridge.twilio.leg import MediaTap
from tests.support import BENCH


@pytest.mark.timeout(120)
def test_frame_path_runs_every_row_over_one_call_and_over_several() -> None:
    command = [sys.executable, str(BENCH / "frame_path.py"), "--frames", "60", "--repeat", "1", "--calls", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "µs" in line]
    assert any("listener callback alone" in row for row in rows)
    interleaved = [row for row in rows if "3 calls, each frame's turn going round them" in row]
    built = use_compiled("auto") and None not in (CallerPath, MediaTap, AiAudioPath)  # frame_path's own test
    assert len(interleaved) == (2 if built else 0), done.stdout
