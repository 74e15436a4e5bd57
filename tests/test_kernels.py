"""The compiled audio kernels give the numpy reference's bytes exactly, and the choice between them is explicit."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.audio import kernels
from telephony_bridge.audio.kernels import DownsamplerToUlaw, UlawUpsampler
from telephony_bridge.clock import SystemClock
from telephony_bridge.errors import ConfigError
from telephony_bridge.inbound import Inbound
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import Outbound
from telephony_bridge.serving import ServerThread
from telephony_bridge.settings import AudioSettings, BargeInSettings
from telephony_bridge.tools.caller import run_call
from tests.support import BridgeProcess, bridge_settings, signed_call, wait_until
from tests.test_end_to_end import speech_band_noise


@pytest.fixture(scope="module")
def extension() -> ModuleType:
    """The built extension; without one, skip locally but fail under CI (the fast path must be tested)."""
    if kernels.EXTENSION is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build and test telephony_bridge.audio._kernels (is a C compiler installed?)")
        pytest.skip("telephony_bridge.audio._kernels is not built here (no C compiler at install time)")
    return kernels.EXTENSION


@st.composite
def chunked(draw: st.DrawFn, bytes_per_sample: int) -> list[bytes]:
    """Random audio in chunks of any size, 0 included: μ-law codes (1 byte a sample) or little-endian PCM16 (2).
    Half the examples are full-scale square-ish waves, which overshoot int16 after filtering (Gibbs ringing), so
    saturation is exercised too."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loud = draw(st.booleans())
    chunks = []
    for size in draw(st.lists(st.integers(0, 400), max_size=12)):
        if bytes_per_sample == 1:  # μ-law 0x00 and 0x80 are the loudest codes, of either sign
            codes = np.where(rng.random(size) < 0.5, 0x00, 0x80) if loud else rng.integers(0, 256, size)
            chunks.append(codes.astype(np.uint8).tobytes())
        else:
            pcm = np.where(rng.random(size) < 0.5, -32768, 32767) if loud else rng.integers(-32768, 32768, size)
            chunks.append(pcm.astype("<i2").tobytes())
    return chunks


def cpu_has_avx2_and_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def filter_builds(extension: ModuleType) -> list[str]:
    """The filters' builds to hold to the reference here: the baseline, and AVX2 wherever the extension runs it.
    On Linux x86-64 a CPU with AVX2 and FMA that cannot run it is a failure: the fast path would go untested."""
    try:
        with running(extension, "avx2"):
            return ["baseline", "avx2"]
    except ValueError as exc:
        if sys.platform == "linux" and platform.machine() == "x86_64" and cpu_has_avx2_and_fma():
            pytest.fail(f"this CPU has AVX2 and FMA, but the filters' AVX2 build does not run: {exc}")
    return ["baseline"]


@contextlib.contextmanager
def running(extension: ModuleType, build: str) -> Iterator[None]:
    before = extension.isa()
    extension.isa(build)
    try:
        yield
    finally:
        extension.isa(before)


@settings(max_examples=200, deadline=None)
@given(chunks=chunked(bytes_per_sample=1))
def test_compiled_upsampler_matches_the_numpy_reference(extension: ModuleType, chunks: list[bytes]) -> None:
    for build in filter_builds(extension):
        with running(extension, build):
            compiled, reference = UlawUpsampler(compiled=True), UlawUpsampler(compiled=False)
            for ulaw in chunks:
                pcm_8k, pcm_16k = compiled.process(ulaw)
                want_8k, want_16k = reference.process(ulaw)
                assert pcm_16k == want_16k, build
                assert len(pcm_16k) == 4 * len(ulaw)
                np.testing.assert_array_equal(pcm_8k, want_8k)


@settings(max_examples=200, deadline=None)
@given(chunks=chunked(bytes_per_sample=2))
def test_compiled_downsampler_matches_the_numpy_reference(extension: ModuleType, chunks: list[bytes]) -> None:
    for build in filter_builds(extension):
        with running(extension, build):
            compiled, reference = DownsamplerToUlaw(compiled=True), DownsamplerToUlaw(compiled=False)
            total = 0
            for pcm in chunks:
                ulaw = compiled.process(pcm)
                assert ulaw == reference.process(pcm), build
                total += len(ulaw)
            assert total == sum(len(pcm) for pcm in chunks) // 4  # one byte per two samples


def test_the_filters_run_their_avx2_build_on_a_cpu_that_has_it(extension: ModuleType) -> None:
    """configure() chooses the build: AVX2 and FMA where this build and the CPU have them (most x86-64 servers)."""
    if "avx2" not in filter_builds(extension):
        pytest.skip("no AVX2 build of the filters runs here (not x86-64 with GCC or Clang, or a CPU without it)")
    assert extension.isa() == "avx2"


def test_a_filter_build_that_cannot_be_had_is_refused_with_a_reason(extension: ModuleType) -> None:
    with pytest.raises(ValueError, match="expected 'baseline' or 'avx2', got 'AVX2'"):
        extension.isa("AVX2")
    if "avx2" not in filter_builds(extension):
        with pytest.raises(ValueError, match="AVX2"):
            extension.isa("avx2")


def test_mean_square_matches_numpy(extension: ModuleType) -> None:
    samples = np.random.default_rng(7).integers(-32768, 32768, 160).astype(np.int16)
    wide = samples.astype(np.float64)
    assert extension.mean_square(samples) == float(np.dot(wide, wide)) / 160
    assert extension.mean_square(np.full(160, -32768, dtype=np.int16)) == 32768.0**2
    assert extension.mean_square(b"") == 0.0


def test_int16_buffers_at_an_odd_address_read_and_write_as_aligned_ones(extension: ModuleType) -> None:
    """Samples and state need not be 2-byte aligned (a numpy view made with an odd byte offset, a state that is a
    slice of a larger buffer): each is read and written bytewise, so the results are those of aligned copies."""
    samples = np.random.default_rng(3).integers(-32768, 32768, 160).astype(np.int16)
    odd = np.frombuffer(b"\x00" + samples.tobytes(), dtype=np.int16, offset=1)
    assert not odd.flags.aligned
    assert extension.mean_square(odd) == extension.mean_square(samples)
    ulaw, pcm = bytes(range(160)) * 2, samples.astype("<i2").tobytes() * 4
    for run, size in ((extension.ulaw_up, extension.UP_STATE_BYTES), (extension.down_ulaw, extension.DOWN_STATE_BYTES)):
        data = ulaw if run is extension.ulaw_up else pcm
        aligned, shifted = bytearray(size), memoryview(bytearray(size + 1))[1:]
        for _ in range(3):  # the state carries history from call to call
            assert run(shifted, data) == run(aligned, data)
            assert bytes(shifted) == bytes(aligned)


# Run in a child, so that UBSan's abort fails the test rather than the test run.
_ALIGNMENT_PROBE = """
import importlib.util, sys
import numpy as np
from telephony_bridge.audio import codec, resample
spec = importlib.util.spec_from_file_location("_kernels", sys.argv[1])
k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(k)
k.configure((2.0 * resample.SINC_TAPS).tobytes(), resample.SINC_TAPS.tobytes(), codec.ULAW_DECODE.tobytes(),
            codec.ULAW_ENCODE.tobytes())
k.mean_square(np.frombuffer(bytes(321), dtype=np.int16, offset=1))
builds = ["baseline"]
try:
    k.isa("avx2")
    builds.append("avx2")
except ValueError:  # no AVX2 build, or a CPU without it
    pass
for build in builds:  # each build of the filters
    k.isa(build)
    k.ulaw_up(memoryview(bytearray(k.UP_STATE_BYTES + 1))[1:], bytes(160))
    k.down_ulaw(memoryview(bytearray(k.DOWN_STATE_BYTES + 1))[1:], bytes(640))
print("ok")
"""


def test_the_kernels_never_read_int16_through_a_misaligned_pointer(tmp_path: Path) -> None:
    """The kernels built with UBSan's alignment check and run on buffers at odd addresses. x86 forgives such
    reads (the results above are right either way), but they are undefined behaviour: a strict-alignment CPU,
    or a compiler that vectorises on the assumption, need not. Built here with gcc; without it, skip locally
    but fail under CI."""
    compiler = shutil.which("gcc")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have gcc to build the kernels with UBSan")
        pytest.skip("no gcc here")
    root = Path(__file__).resolve().parent.parent
    built = tmp_path / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    source, include = root / "telephony_bridge/audio/_kernels.c", sysconfig.get_paths()["include"]
    sanitize = ("-fsanitize=alignment", "-fno-sanitize-recover=all")
    command = [compiler, "-O2", "-shared", "-fPIC", *sanitize, f"-I{include}", str(source), "-o", str(built), "-lm"]
    subprocess.run(command, check=True, capture_output=True)
    probe = subprocess.run(
        [sys.executable, "-c", _ALIGNMENT_PROBE, str(built)], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-1500:]


def test_bad_arguments_are_refused_with_a_reason(extension: ModuleType) -> None:
    with pytest.raises(ValueError, match="74-byte upsampler state"):
        extension.ulaw_up(bytearray(10), b"\xff" * 160)
    with pytest.raises(ValueError, match="even number of PCM16 bytes"):
        extension.down_ulaw(bytearray(extension.DOWN_STATE_BYTES), b"\x00" * 3)
    with pytest.raises(TypeError):
        extension.ulaw_up(bytes(extension.UP_STATE_BYTES), b"\xff")  # state must be writable
    taps = np.arange(38, dtype=np.float64)  # not symmetric
    inexact = np.full(38, 0.1)  # symmetric, but not a multiple of 2**-32: sums would depend on their order
    try:
        with pytest.raises(ValueError, match="symmetric"):
            extension.configure(taps.tobytes(), taps.tobytes(), bytes(512), bytes(65536))
        with pytest.raises(ValueError, match=r"multiples of 2\*\*-32"):
            extension.configure(inexact.tobytes(), inexact.tobytes(), bytes(512), bytes(65536))
        with pytest.raises(RuntimeError, match="before configure"):  # a failed configure leaves it unusable
            extension.ulaw_up(bytearray(extension.UP_STATE_BYTES), b"\xff")
    finally:
        assert kernels._import_extension()[0] is extension  # configured again as the package sets it up


def test_a_choice_that_cannot_be_had_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="expected one of auto, compiled, numpy"):
        kernels.use_compiled("fastest")
    assert kernels.use_compiled("numpy") is False
    assert kernels.use_compiled("auto") is (kernels.EXTENSION is not None)
    if kernels.EXTENSION is None:
        with pytest.raises(ConfigError, match="not built"):
            UlawUpsampler(compiled=True)


def _serve(env_value: str, block_extension: bool) -> subprocess.CompletedProcess[str]:
    """``telephony-bridge serve --dev`` in a child with ``audio.kernels`` from the environment; it must refuse
    before it starts anything."""
    code = (
        "import sys\n"
        + ("sys.modules['telephony_bridge.audio._kernels'] = None\n" if block_extension else "")
        + "from telephony_bridge.cli import main\n"
        + "sys.exit(main(['serve', '--dev', '--port', '0']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env["BRIDGE__AUDIO__KERNELS"] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("value", "block", "reason"),
    [
        ("compiled", True, "audio.kernels is 'compiled', but the C extension"),
        ("fastest", False, "audio.kernels"),
    ],
)
def test_serve_refuses_kernels_it_cannot_have(value: str, block: bool, reason: str) -> None:
    result = _serve(value, block)
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and reason in result.stderr


@pytest.mark.parametrize("choice", ["compiled", "numpy"])
async def test_a_call_on_either_kernels_echoes_what_was_said(
    choice: str, emulator: ServerThread, start_bridge: Callable[..., ServerThread]
) -> None:
    if choice == "compiled" and kernels.EXTENSION is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build and test telephony_bridge.audio._kernels (is a C compiler installed?)")
        pytest.skip("telephony_bridge.audio._kernels is not built here")
    bridge = start_bridge(bridge_settings(emulator, **{"audio.kernels": choice}))
    said = speech_band_noise()
    result = await run_call(signed_call(bridge, audio_in=said, seconds=3.5))
    assert result.violations == [] and result.ended_by == "caller"
    heard = result.heard.astype(float)
    corr = np.correlate(heard, said.astype(float), mode="valid")
    lag = int(np.argmax(corr))
    aligned = heard[lag : lag + said.size]
    assert corr[lag] / (np.linalg.norm(said) * np.linalg.norm(aligned)) > 0.9
    wait_until(lambda: httpx.get(bridge.http_url + "/status", timeout=5).json()["calls"] == [], what="the call to end")


@pytest.mark.parametrize(("env", "said"), [({}, "auto"), ({"BRIDGE__AUDIO__KERNELS": "numpy"}, "numpy")])
def test_serve_says_which_kernels_it_runs(env: dict[str, str], said: str) -> None:
    want = "numpy; compiled frame path: none"
    if kernels.use_compiled(said):
        assert kernels.EXTENSION is not None
        built = f"compiled ({kernels.EXTENSION.isa()} filters)"
        want = f"{built}; compiled frame path: twilio media, caller audio, savants audio, ai audio"
    bridge = BridgeProcess(None, env, args=("serve", "--dev"))
    try:
        assert f"audio kernels: {want}" in [str(line["msg"]) for line in bridge.lines]
    finally:
        bridge.kill()


@pytest.mark.parametrize("choice", ["compiled", "numpy"])
def test_inbound_outbound_and_the_vad_run_the_kernels_the_setting_names(choice: str) -> None:
    if choice == "compiled" and kernels.EXTENSION is None:
        pytest.skip("telephony_bridge.audio._kernels is not built here")  # under CI the ``extension`` tests fail
    audio = AudioSettings(kernels=choice)
    inbound = Inbound(audio, BargeInSettings(enabled=True), Metrics(), SystemClock())
    outbound = Outbound(audio, SystemClock(), NoSink())
    want = kernels.EXTENSION if choice == "compiled" else None
    assert inbound._pipeline._upsampler._compiled is want
    assert outbound._buffer._to_caller._downsampler._compiled is want
    assert inbound.detector is not None
    gate = inbound.detector._vad._mean_square
    assert gate == (kernels.EXTENSION.mean_square if want else kernels._numpy_mean_square)


class NoSink:
    """An AudioSink nothing is sent to: these tests only build an Outbound."""

    async def send_audio(self, ulaw: bytes) -> None:
        raise AssertionError("nothing is sent")

    async def send_mark(self, name: str) -> None:
        raise AssertionError("nothing is sent")

    async def clear(self) -> None:
        raise AssertionError("nothing is sent")

    def can_send_now(self) -> bool:
        return False

    def send_audio_nowait(self, ulaw: bytes) -> None:
        raise AssertionError("nothing is sent")
