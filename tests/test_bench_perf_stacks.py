"""bench/perf_stacks.py's reading of ``perf script``: which Python function each CPU sample is charged to."""

from __future__ import annotations

import importlib.util
import sys

from tests.support import BENCH

_spec = importlib.util.spec_from_file_location("perf_stacks", BENCH / "perf_stacks.py")
assert _spec is not None and _spec.loader is not None
perf_stacks = importlib.util.module_from_spec(_spec)
sys.modules["perf_stacks"] = perf_stacks
_spec.loader.exec_module(perf_stacks)

# Three samples as ``perf script -F ip,sym`` prints them after ``perf inject --jit``: innermost frame first, a
# trampoline and its evaluator frame per Python call.
SCRIPT = """\
\t  16a08b _PyObject_Free
\t   905e5 _PyEval_EvalFrameDefault
\t      85 py::Inbound.push:/work/main/telephony_bridge/inbound.py
\t  2bc5f0 py_trampoline_evaluator
\t   905e5 _PyEval_EvalFrameDefault
\t      85 py::Call._caller_audio:/work/main/telephony_bridge/bridge.py
\t  2bc5f0 py_trampoline_evaluator
\t      85 py::StreamSocket.on_ws_frame:/work/main/telephony_bridge/twilio/stream_socket.py

\tffffffff tcp_sendmsg ([kernel.kallsyms])
\t   77aa1 __send
\t      85 py::SavantsConnection.send_audio_nowait:/work/main/telephony_bridge/savants/client.py
\t      85 py::SavantsConnection.send_audio_nowait:/work/main/telephony_bridge/savants/client.py
\t      85 py::Call._caller_audio:/work/main/telephony_bridge/bridge.py

\t   12345 epoll_wait
\t   23456 uv__io_poll

"""


def test_each_sample_is_charged_to_its_innermost_python_frame_and_to_every_caller() -> None:
    summary = perf_stacks.summarize_script(SCRIPT, top=10, depth=2).splitlines()
    assert summary[0].startswith("3 CPU samples")
    rows = {line[15:]: line[:13] for line in summary[1:] if line[5:8] == " / "}  # "iii.i / sss.s  function"
    assert rows["Call._caller_audio (bridge.py)"] == " 66.7 /   0.0"  # on two stacks, innermost on neither
    assert rows["Inbound.push (inbound.py)"] == " 33.3 /  33.3"
    # a trampoline and its frame, or a repeated frame, count once
    assert rows["SavantsConnection.send_audio_nowait (client.py)"] == " 33.3 /  33.3"
    assert rows[perf_stacks.NO_PYTHON_FRAME] == " 33.3 /  33.3"
    paths = summary[summary.index("outermost 2 Python frames of each sample, commonest first:") + 1 :]
    assert " 33.3  StreamSocket.on_ws_frame (stream_socket.py) > Call._caller_audio (bridge.py)" in paths
    assert " 33.3  Call._caller_audio (bridge.py) > SavantsConnection.send_audio_nowait (client.py)" in paths


def test_no_samples_says_what_to_check() -> None:
    assert "Python 3.13+" in perf_stacks.summarize_script("\n\n")


def test_refuses_a_server_python_without_perf_jit() -> None:
    why = perf_stacks.available((3, 11))
    assert why is not None and "3.13" in why and "--server-python" in why
