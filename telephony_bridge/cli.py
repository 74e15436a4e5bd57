"""``telephony-bridge``: argv -> settings -> one run function per subcommand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import uvicorn

from telephony_bridge import __version__
from telephony_bridge.audio import kernels
from telephony_bridge.errors import BridgeError, ConfigError
from telephony_bridge.ops import logging as oplog
from telephony_bridge.ops.gc_tuning import tune_gc
from telephony_bridge.serving import (
    DrainingServer,
    ServerThread,
    bind_socket,
    host_port,
    uvicorn_config,
    warn_if_ipv6_only,
)
from telephony_bridge.settings import Settings, load_settings

if TYPE_CHECKING:
    from telephony_bridge.tools.emulator import EmulatorConfig

log = logging.getLogger("telephony_bridge")

DEV_API_KEY = "dev-key"
# The emulator's HS256 key, when set: another process that checks its tokens (bench/lean_ai.py) shares it.
# Read from the environment, not a flag, so it is never in a process listing.
EMULATOR_JWT_SECRET_ENV = "EMULATOR_JWT_SECRET"
DEV_DEVICE_IDS = ("emulator-device-1", "emulator-device-2")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"telephony-bridge: configuration error: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"telephony-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="telephony-bridge", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the bridge", formatter_class=fmt)
    serve.add_argument("--config", help="YAML configuration (omitted: $BRIDGE_CONFIG, else built-in defaults)")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="allow dev mode: with no SAVANTS_BASE_URL, run against an embedded Savants emulator (BRIDGE_DEV=1)",
    )
    serve.add_argument("--host", help="listen address (overrides HOST / server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides PORT / server.port)")
    serve.add_argument("--sip-port", type=int, help="SIP ingress on this UDP+TCP port (overrides SIP_PORT / sip.port)")
    serve.add_argument(
        "--workers", type=int, help="worker processes on the one port (overrides server.workers; > 1 needs Redis)"
    )
    serve.add_argument(
        "--dev-voice",
        default="echo",
        choices=["echo", "tone", "talker"],
        help="voice of the embedded emulator in dev mode",
    )
    serve.set_defaults(run=run_serve)

    emulator = sub.add_parser(
        "emulator",
        help="run a local Savants Voice API emulator",
        formatter_class=fmt,
        epilog=f"{EMULATOR_JWT_SECRET_ENV}: the tokens' HS256 key, at least 32 bytes (default: random at start-up)",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=9100)
    emulator.add_argument("--voice", default="echo", choices=["echo", "tone", "file", "talker"])
    emulator.add_argument("--api-key", default=DEV_API_KEY, help="the device API key clients must send")
    emulator.add_argument("--tone-hz", type=float, default=440.0, help="frequency of the 'tone' voice")
    emulator.add_argument("--wav", help="16 kHz mono 16-bit WAV played by the 'file' voice")
    emulator.add_argument("--echo-delay", type=float, default=0.2, help="seconds the 'echo' voice waits")
    emulator.add_argument("--talker-reply", type=float, default=3.0, help="seconds the 'talker' voice speaks")
    emulator.add_argument(
        "--connected-type",
        default="savant_voice_connected",
        choices=["savant_voice_connected", "vapi_connected"],
        help="confirmation message type (the docs use both)",
    )
    emulator.add_argument("--burst", action="store_true", help="send the voice as fast as it is made, like TTS")
    emulator.add_argument("--close-after", type=float, help="hang up each session normally after this many seconds")
    emulator.add_argument("--token-delay", type=float, default=0.0, help="answer token requests this much late")
    emulator.add_argument("--confirm-delay", type=float, default=0.0, help="confirm sessions this much late")
    emulator.add_argument(
        "--fault", default="none", choices=["none", "drop", "error", "garbage"], help="break each session"
    )
    emulator.add_argument("--fault-after", type=float, default=1.0, help="seconds into a session for --fault")
    emulator.add_argument(
        "--session-fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="arm a session fault, e.g. kind=close,close_code=1001,after_s=2,count=5,probability=0.5,devices=a+b "
        "(kinds: close, error, garbage, reset, stall, no_confirm; repeatable; see docs/emulator.md)",
    )
    emulator.add_argument(
        "--token-fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="arm a token endpoint fault, e.g. status=503,count=3 or delay_s=5,probability=0.1 (repeatable)",
    )
    emulator.add_argument("--fault-seed", type=int, help="seed for faults with a probability (repeatable runs)")
    emulator.add_argument("--log-level", default="INFO")
    emulator.set_defaults(run=run_emulator)

    call = sub.add_parser("call", help="act as Twilio for one call against a bridge", formatter_class=fmt)
    call.add_argument("--url", default="ws://127.0.0.1:8080/media-stream", help="the bridge's media stream URL")
    call.add_argument("--wav", help="what the caller says: mono 16-bit WAV at 8 or 16 kHz (omitted: silence)")
    call.add_argument("--out", help="write what the caller heard to this WAV (8 kHz)")
    call.add_argument("--seconds", type=float, default=5.0, help="hang up after this long")
    _add_twilio_flow_options(call)
    call.add_argument(
        "--no-webhook", action="store_true", help="open the stream directly, skipping POST /voice (no stream token)"
    )
    call.set_defaults(run=run_call)

    load = sub.add_parser("loadtest", help="many simulated calls at once, with a summary", formatter_class=fmt)
    load.add_argument("--url", default="ws://127.0.0.1:8080/media-stream", help="the bridge's media stream URL")
    load.add_argument("--calls", type=int, default=20, help="calls in all")
    load.add_argument("--concurrency", type=int, default=10, help="calls at once at most")
    load.add_argument("--seconds", type=float, default=10.0, help="length of each call")
    load.add_argument("--ramp", type=float, default=2.0, help="start the calls over this many seconds")
    load.add_argument("--wav", help="what every caller says (omitted: silence)")
    load.add_argument("--deadline", type=float, help="give up on the whole run after this many seconds")
    load.add_argument("--pid", type=int, nargs="+", default=[], help="report the CPU these bridge processes use")
    load.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    load.add_argument("--sip", metavar="URI", help="place SIP calls to this sip:ai@HOST:PORT instead of Twilio streams")
    load.add_argument("--transport", choices=["udp", "tcp"], default="udp", help="SIP transport with --sip")
    _add_twilio_flow_options(load)
    load.set_defaults(run=run_loadtest)

    sipcall = sub.add_parser("sipcall", help="place one SIP call against a bridge, like a trunk", formatter_class=fmt)
    sipcall.add_argument("target", help="the bridge's SIP URI, e.g. sip:ai@127.0.0.1:5060")
    sipcall.add_argument("--wav", help="what the caller says: mono 16-bit WAV at 8 or 16 kHz (omitted: silence)")
    sipcall.add_argument("--out", help="write what the caller heard to this WAV (8 kHz)")
    sipcall.add_argument("--seconds", type=float, default=5.0, help="hang up (BYE) after this long")
    sipcall.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    sipcall.add_argument("--dtmf", default="", help="keys to press (RFC 4733), one every 0.5 s from 1 s, e.g. 12#")
    sipcall.add_argument("--user", default="", help="digest user, if the bridge challenges")
    sipcall.add_argument("--password", default="", help="digest password (omitted: $SIP_PASSWORD)")
    sipcall.set_defaults(run=run_sipcall)
    return parser


def _add_twilio_flow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth-token", help="sign requests with this Twilio auth token (omitted: $TWILIO_AUTH_TOKEN, else unsigned)"
    )
    parser.add_argument("--public-url", help="the URL Twilio would call, to sign over (omitted: the bridge's own)")


# --- serve -------------------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    given = (
        ("server.host", args.host),
        ("server.port", args.port),
        ("server.workers", args.workers),
        ("sip.port", args.sip_port),
    )
    overrides: dict[str, object] = {k: v for k, v in given if v is not None}
    if args.dev:
        overrides["dev"] = True
    settings = load_settings(args.config, **overrides)
    _require_production_settings(settings)  # before anything starts: a missing setting is one sentence
    kernels.use_compiled(settings.audio.kernels)  # a choice that cannot be had stops here, in one sentence
    if settings.sip.port is not None:
        from telephony_bridge.sip.server import require_sip_security

        require_sip_security(settings)
    oplog.configure(settings.logging.level, settings.logging.format)
    if settings.server.workers > 1:
        from telephony_bridge.workers import supervise

        return supervise(settings)
    emulator: ServerThread | None = None
    if settings.dev_mode:
        emulator = _start_dev_emulator(args.dev_voice)
        settings = _dev_settings(settings, emulator.http_url)
        log.warning(
            "DEV MODE, not for production: SAVANTS_BASE_URL is not set, so calls go to the embedded Savants "
            "emulator at %s (voice %r); the bridge listens on %s%s, streams without a stream token are accepted; "
            "set SAVANTS_BASE_URL, SAVANTS_API_KEY and SAVANTS_DEVICE_IDS for production",
            emulator.http_url,
            args.dev_voice,
            settings.listen_host,
            "" if settings.server.host else " only (HOST not given)",
        )
    host = settings.listen_host
    ops_socks = [bind_socket(host, port) for port in ops_ports(settings, worker=0)]
    try:
        serve_on(settings, bind_socket(host, settings.server.port), ops_socks=ops_socks)
    finally:
        if emulator is not None:
            emulator.stop()
    return 0


def ops_ports(settings: Settings, worker: int) -> list[int]:
    """The ops listeners a process binds besides the public one: the shared ``server.ops_port``, and its own
    ``server.worker_ops_port + worker``."""
    own = settings.server.worker_ops_ports()
    shared = [] if settings.server.ops_port is None else [settings.server.ops_port]
    return shared + ([own[worker]] if own else [])


def serve_on(
    settings: Settings, sock: socket.socket, worker: int | None = None, ops_socks: Sequence[socket.socket] = ()
) -> None:
    """Serve the bridge on ``sock`` (and /status, /metrics on ``ops_socks``, when there are any) until a signal
    stops it (``worker``: this process is one of several)."""
    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        runner.run(_serve_bridge(settings, sock, worker, ops_socks))


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it): it lowers the event loop's cost per frame;
    the stdlib loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve_bridge(
    settings: Settings, sock: socket.socket, worker: int | None, ops_socks: Sequence[socket.socket]
) -> None:
    from telephony_bridge.app import create_app, drain

    app = create_app(settings, ops_ports=[ops.getsockname()[1] for ops in ops_socks])
    server = DrainingServer(uvicorn_config(app), lambda: drain(app))
    tune_gc(settings.server.gc_young_threshold, tuned=settings.server.gc_tuning)
    host = settings.listen_host
    # A line of its own: the listening lines keep the shape that scripts read (tests/support.py).
    log.info("audio kernels: %s; compiled frame path: %s", *_compiled(settings.audio.kernels))
    if worker is None:
        log.info("bridge listening on %s", host_port(host, sock.getsockname()[1]))
        warn_if_ipv6_only(sock, host, "listening", "IPv4 clients", "server.host")  # once: ops share the host
    else:
        log.info("worker %d (pid %d) serving on %s", worker, os.getpid(), host_port(host, sock.getsockname()[1]))
    for ops in ops_socks:  # one server, several listeners: the app tells them apart by port
        log.info("ops listening on %s (/status, /metrics, /healthz, /readyz)", host_port(host, ops.getsockname()[1]))
    await server.serve(sockets=[sock, *ops_socks])


def _start_dev_emulator(voice: str) -> ServerThread:
    from telephony_bridge.tools.emulator import EmulatorConfig, create_emulator_app

    server = ServerThread(create_emulator_app(EmulatorConfig(api_key=DEV_API_KEY, voice=voice)))  # type: ignore[arg-type]
    server.start()
    return server


def _dev_settings(settings: Settings, emulator_url: str) -> Settings:
    """Point the Savants side at the embedded emulator, keeping anything the user did configure."""
    savants = settings.savants
    return load_settings(
        env={},
        **{
            **_flatten(settings),
            "savants.base_url": emulator_url,
            "savants.api_key": savants.api_key.get_secret_value() or DEV_API_KEY,
            "savants.device_ids": list(savants.device_ids or DEV_DEVICE_IDS),
            "embedded_emulator": True,
        },
    )


def _flatten(settings: Settings) -> dict[str, object]:
    """Settings as dotted keys with secrets revealed, to rebuild a validated copy."""
    out: dict[str, object] = {}
    for section, value in settings:
        if hasattr(value, "model_fields"):
            for key, item in value:
                out[f"{section}.{key}"] = item.get_secret_value() if hasattr(item, "get_secret_value") else item
        else:
            out[section] = value
    return out


def _require_production_settings(settings: Settings) -> None:
    """Never fall into dev mode by accident: a deploy missing a variable stops, naming what is missing."""
    savants = settings.savants
    if settings.dev and not savants.base_url:
        return
    missing = [
        var
        for var, unset in (
            ("SAVANTS_BASE_URL", not savants.base_url),
            ("SAVANTS_API_KEY", not savants.api_key.get_secret_value()),
            ("SAVANTS_DEVICE_IDS", not savants.device_ids),
        )
        if unset
    ]
    if not missing:
        return
    keys = ", ".join(f"savants.{var.removeprefix('SAVANTS_').lower()}" for var in missing)
    sentence = f"{', '.join(missing)} must be set (config keys {keys}) to reach Savants"
    if not savants.base_url:
        sentence += ", or pass --dev (BRIDGE_DEV=1) to run against the embedded Savants emulator"
    raise ConfigError(sentence)


# --- emulator ----------------------------------------------------------------------------------------------


def run_emulator(args: argparse.Namespace) -> int:
    from telephony_bridge.tools.emulator import create_emulator_app

    config = emulator_config(args)
    oplog.configure(args.log_level.upper())  # after the config: a wrong option is one plain sentence
    log.info("Savants emulator on http://%s:%d (voice %r)", args.host, args.port, args.voice)
    uvicorn.Server(uvicorn_config(create_emulator_app(config), host=args.host, port=args.port)).run()
    return 0


def emulator_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EmulatorConfig:
    """The emulator's flags (and its key from ``env``, the process's environment by default) as a checked
    ``EmulatorConfig``: a wrong fault spec or a short key raises ``ConfigError``."""
    from telephony_bridge.tools.emulator import EmulatorConfig
    from telephony_bridge.tools.emulator.faults import parse_spec, session_fault_from_mapping, token_fault_from_mapping

    secret = (os.environ if env is None else env).get(EMULATOR_JWT_SECRET_ENV)
    return EmulatorConfig(
        **({"jwt_secret": secret} if secret else {}),
        api_key=args.api_key,
        voice=args.voice,
        tone_hz=args.tone_hz,
        wav_path=args.wav,
        echo_delay_s=args.echo_delay,
        talker_reply_s=args.talker_reply,
        connected_type=args.connected_type,
        burst=args.burst,
        close_after_s=args.close_after,
        token_delay_s=args.token_delay,
        confirm_delay_s=args.confirm_delay,
        fault=args.fault,
        fault_after_s=args.fault_after,
        session_faults=tuple(session_fault_from_mapping(parse_spec(spec)) for spec in args.session_fault),
        token_faults=tuple(token_fault_from_mapping(parse_spec(spec)) for spec in args.token_fault),
        fault_seed=args.fault_seed,
    )


# --- call --------------------------------------------------------------------------------------------------


def run_call(args: argparse.Namespace) -> int:
    from telephony_bridge.tools.commands import call_command

    oplog.configure("WARNING")
    return asyncio.run(
        call_command(
            args.url,
            args.wav,
            args.out,
            args.seconds,
            auth_token=args.auth_token,
            public_url=args.public_url,
            webhook=not args.no_webhook,
        )
    )


def run_sipcall(args: argparse.Namespace) -> int:
    from telephony_bridge.tools.sip_caller import sipcall_command

    oplog.configure("WARNING")
    password = args.password or os.environ.get("SIP_PASSWORD", "")
    return asyncio.run(
        sipcall_command(
            args.target,
            args.wav,
            args.out,
            args.seconds,
            transport=args.transport,
            dtmf=args.dtmf,
            user=args.user,
            password=password,
        )
    )


def run_loadtest(args: argparse.Namespace) -> int:
    from telephony_bridge.tools.loadtest import loadtest_command

    oplog.configure("WARNING")
    if args.sip:
        from telephony_bridge.tools.sip_caller import sip_loadtest_command

        return asyncio.run(
            sip_loadtest_command(
                args.sip, args.calls, args.concurrency, args.seconds, args.ramp, args.wav, args.transport
            )
        )
    return asyncio.run(
        loadtest_command(
            args.url,
            args.calls,
            args.concurrency,
            args.seconds,
            args.ramp,
            args.wav,
            auth_token=args.auth_token,
            public_url=args.public_url,
            deadline_s=args.deadline,
            pids=tuple(args.pid),
            json_out=args.json,
        )
    )


def _compiled(choice: str) -> tuple[str, str]:
    """What ``audio.kernels`` runs: the kernels (compiled: with the build of the filters this CPU runs), and which
    parts of the per-frame path are compiled (built by setup.py; each falls back to Python where it is not)."""
    from telephony_bridge import inbound, outbound
    from telephony_bridge.savants import client
    from telephony_bridge.twilio import leg

    if not kernels.use_compiled(choice):
        return "numpy", "none"
    built = {
        "twilio media": leg.MediaTap,
        "caller audio": inbound.CallerPath,
        "savants audio": client.AudioTap,
        "ai audio": outbound.AiAudioPath,
    }
    parts = [name for name, part in built.items() if part is not None]
    isa = getattr(kernels.EXTENSION, "isa", None)  # an extension built before 7 Dec has no builds to name
    return f"compiled ({isa()} filters)" if isa is not None else "compiled", ", ".join(parts) or "none"
