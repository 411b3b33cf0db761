"""``dtucenter-sim``: virtual DTUs for trying out, testing and load-testing a center.

    dtucenter-sim dtu --server 127.0.0.1:20000 --count 1000 --psn 100000 --values 8 --interval 5
    dtucenter-sim modbus --server 127.0.0.1:20100 --registration 'DTU-{n:04d}' --count 100 --units 1,2
    dtucenter-sim bridge --serial /dev/ttyUSB0 --server 127.0.0.1:20100 --registration DTU-0001

Progress goes to stderr once a second; Ctrl-C (or ``--duration``) stops
every device, and a one-line summary is printed at exit. SIGUSR1 drops every
connection at once, as a power cut would: the fleet redials together (the
benchmark's redial storm).
"""

from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from dtucenter.cli import _bounded
from dtucenter.dtu import wire
from dtucenter.sim.dtu import DTUSettings, VirtualDTU
from dtucenter.sim.fleet import Fleet, Reporter, run
from dtucenter.sim.links import Device, TCPConnector, UDPConnector, parse_server, spread_sources
from dtucenter.sim.modbus import (
    REGISTRATION_MODES,
    TransparentDTU,
    meters_for,
    numbered_registration,
    parse_packet_text,
    parse_units,
)
from dtucenter.sim.stats import PACKET_PROGRESS_FIELDS, PROGRESS_FIELDS, SimStats

_Number = TypeVar("_Number", int, float)
_Parsed = TypeVar("_Parsed")


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def _checked(parse: Callable[[str], _Parsed]) -> Callable[[str], _Parsed]:
    def wrapped(text: str) -> _Parsed:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return wrapped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtucenter-sim", description="Virtual DTUs for a dtucenter.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser, many: bool = True) -> None:
        sub.add_argument("--server", required=True, type=_checked(parse_server), help="center HOST:PORT")
        if many:
            sub.add_argument("--count", type=_bounded(1, 1_000_000), default=1, help="number of devices (default 1)")
            sub.add_argument("--connect-rate", type=_positive(float), default=1000.0,
                             help="new connections per second while starting (default 1000)")
            sub.add_argument("--sources", type=_bounded(1, 65535), default=None,
                             help="loopback source addresses to spread over (default: one per 2500 devices above 2500)")
        sub.add_argument("--duration", type=_positive(float), help="stop after this many seconds (default: Ctrl-C)")
        sub.add_argument("--report", metavar="FILE", help="write JSON counters and latencies every report interval")
        sub.add_argument("--report-interval", type=_positive(float), default=1.0,
                         help="seconds between progress lines and reports (default 1)")
        sub.add_argument("--quiet", action="store_true", help="no progress line, only the summary")
        sub.add_argument("--log", metavar="FILE", help="write the full Twisted log here")
        sub.add_argument("--seed", type=int, default=1, help="random seed (default 1)")

    dtu = commands.add_parser("dtu", help="DTUs speaking the DTU protocol")
    common(dtu)
    dtu.add_argument("--psn", type=_bounded(0, 0xFFFFFFFF), default=100000,
                     help="PSN of the first DTU (default 100000)")
    dtu.add_argument("--password", type=_bounded(0, 0xFFFFFFFF), default=0, help="PASS every DTU logs in with")
    dtu.add_argument("--values", type=_bounded(0, 511), default=8, help="values per upload (default 8)")
    dtu.add_argument("--interval", type=_positive(float), default=10.0,
                     help="seconds between uploads unless the center sets SendTestTime (default 10)")
    dtu.add_argument("--mode", type=_bounded(0, 255), default=None,
                     help="SendTestMode to use instead of the one LoginAck gives (0 on change, 255 periodic)")
    dtu.add_argument("--drift-interval", type=_positive(float), default=1.0,
                     help="seconds between value changes in the on-change modes (default 1)")
    dtu.add_argument("--ack-timeout", type=_positive(float), default=10.0,
                     help="seconds to wait for SendTestAck before sending again (default 10)")
    dtu.add_argument("--udp", action="store_true", help="send frames as UDP datagrams instead of TCP")
    dtu.set_defaults(run=run_dtus)

    modbus = commands.add_parser("modbus", help="transparent DTUs with simulated Modbus meters")
    common(modbus)
    modbus.add_argument("--registration", required=True,
                        help="registration packet (TEXT or hex:..); with --count, {n} (e.g. DTU-{n:04d}) "
                             "is replaced by the DTU's number, else the number is appended")
    modbus.add_argument("--first", type=_bounded(0, 10**9), default=1, help="number of the first DTU (default 1)")
    modbus.add_argument("--heartbeat", help="heartbeat packet (TEXT or hex:..), default none")
    modbus.add_argument("--heartbeat-interval", type=_positive(float), default=30.0, help="seconds (default 30)")
    modbus.add_argument("--registration-mode", choices=REGISTRATION_MODES, default="connect",
                        help="when the registration is sent (USR's send type): connect (once, default), "
                             "data (in front of every packet only), both")
    modbus.add_argument("--bare-heartbeats", action="store_true",
                        help="in data/both mode, send heartbeats without the registration in front")
    modbus.add_argument("--protocol", choices=("rtu", "tcp"), default="rtu",
                        help="rtu: RTU frames with CRC; tcp: MBAP (the DTU's Modbus TCP mode)")
    modbus.add_argument("--units", type=_checked(parse_units), default=[1], help="meter unit ids, e.g. 1,2,3 or 1-8")
    modbus.set_defaults(run=run_modbus)

    bridge = commands.add_parser("bridge", help="relay a real serial port to the center")
    common(bridge, many=False)
    bridge.add_argument("--serial", required=True, metavar="DEVICE", help="serial device, e.g. /dev/ttyUSB0")
    bridge.add_argument("--registration", required=True, help="registration packet (TEXT or hex:..)")
    bridge.add_argument("--heartbeat", help="heartbeat packet (TEXT or hex:..), default none")
    bridge.add_argument("--heartbeat-interval", type=_positive(float), default=30.0, help="seconds (default 30)")
    bridge.add_argument("--baudrate", type=_positive(int), default=9600)
    bridge.add_argument("--bytesize", type=int, choices=(5, 6, 7, 8), default=8)
    bridge.add_argument("--parity", choices=("N", "E", "O", "M", "S"), default="N")
    bridge.add_argument("--stopbits", type=float, choices=(1, 1.5, 2), default=1)
    bridge.set_defaults(run=run_bridge)
    return parser


class SimError(Exception):
    """Reported as one line on stderr with exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _raise_file_limit()
    _start_logging(args.log)
    from twisted.internet import reactor

    try:
        return int(args.run(reactor, args))
    except SimError as e:
        print(f"dtucenter-sim: {e}", file=sys.stderr)
        return 1


def _raise_file_limit() -> None:
    # Every device is a socket; the default soft limit (1024) is far below what a load test needs.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start_logging(path: str | None) -> None:
    if path:
        # Open for as long as the process logs: no block could hold it.
        log_file = open(path, "a")  # noqa: SIM115
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
        return
    # Without a log file only real trouble reaches the terminal; the progress line says the rest.
    errors_only = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)]
    )
    globalLogBeginner.beginLoggingTo([errors_only], redirectStandardIO=False)


def _fleet_run(reactor: Any, args: argparse.Namespace, stats: SimStats,
               build: Callable[[int, random.Random], Device],
               fields: tuple[tuple[str, str], ...] = PROGRESS_FIELDS) -> int:
    """Devices from ``build(i, rng)`` behind TCP or UDP connectors, spread over source addresses."""
    server = args.server
    sources = spread_sources(args.count, args.sources)
    top = MultiService()
    reporter = Reporter(reactor, stats, report_path=args.report, interval=args.report_interval, quiet=args.quiet,
                        fields=fields)
    reporter.setServiceParent(top)
    fleet = Fleet(reactor, stats, args.connect_rate)
    fleet.setServiceParent(top)
    connector_class = UDPConnector if getattr(args, "udp", False) else TCPConnector
    if connector_class is UDPConnector and not _is_ip(server[0]):
        raise SimError(f"--udp needs the server as an IP address, got {server[0]!r}")
    for i in range(args.count):
        rng = random.Random(args.seed * 1_000_003 + i)
        device = build(i, rng)
        source = sources[i % len(sources)] if sources else None
        connector = connector_class(reactor, device, server, source, rng)
        if isinstance(device, VirtualDTU):
            device.server = server
            device.on_redirect = connector.redirect
        fleet.add(connector)
    signal.signal(signal.SIGUSR1, lambda number, frame: reactor.callFromThread(fleet.drop_all))
    return run(reactor, top, args.duration)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def run_dtus(reactor: Any, args: argparse.Namespace) -> int:
    stats = SimStats()
    if args.psn + args.count - 1 > 0xFFFFFFFF:
        raise SimError("--psn + --count runs past the largest PSN (4294967295)")
    if args.values > wire.max_items(2, fixed=2):
        raise SimError(f"--values: at most {wire.max_items(2, fixed=2)} values fit one frame")

    def build(i: int, rng: random.Random) -> VirtualDTU:
        settings = DTUSettings(
            psn=args.psn + i, password=args.password, values=args.values, interval=args.interval,
            mode=args.mode, drift_interval=args.drift_interval, ack_timeout=args.ack_timeout,
        )
        return VirtualDTU(settings, reactor, stats, rng)

    return _fleet_run(reactor, args, stats, build)


def run_modbus(reactor: Any, args: argparse.Namespace) -> int:
    stats = SimStats()
    try:
        heartbeat = parse_packet_text(args.heartbeat) if args.heartbeat else None
        registrations = [
            parse_packet_text(numbered_registration(args.registration, args.first + i) if args.count > 1
                              else args.registration)
            for i in range(args.count)
        ]
    except ValueError as e:
        raise SimError(str(e)) from None

    def build(i: int, rng: random.Random) -> TransparentDTU:
        return TransparentDTU(
            registrations[i], args.protocol, meters_for(args.units, reactor, rng), reactor, stats,
            heartbeat=heartbeat, heartbeat_interval=args.heartbeat_interval,
            registration_mode=args.registration_mode, bare_heartbeats=args.bare_heartbeats,
        )

    return _fleet_run(reactor, args, stats, build, PACKET_PROGRESS_FIELDS)


def run_bridge(reactor: Any, args: argparse.Namespace) -> int:
    from twisted.internet.serialport import SerialPort

    from dtucenter.sim.bridge import SerialBridge

    stats = SimStats()
    try:
        registration = parse_packet_text(args.registration)
        heartbeat = parse_packet_text(args.heartbeat) if args.heartbeat else None
    except ValueError as e:
        raise SimError(str(e)) from None
    bridge = SerialBridge(registration, reactor, stats, heartbeat, args.heartbeat_interval)
    try:
        stopbits: float | int = int(args.stopbits) if args.stopbits in (1, 2) else args.stopbits
        SerialPort(
            bridge.serial_protocol, args.serial, reactor, baudrate=args.baudrate,
            bytesize=args.bytesize, parity=args.parity, stopbits=stopbits,
        )
    except Exception as e:  # pyserial raises SerialException, OSError or ValueError
        raise SimError(f"cannot open serial port {args.serial}: {e}") from None
    top = MultiService()
    Reporter(reactor, stats, report_path=args.report, interval=args.report_interval,
             quiet=args.quiet, fields=PACKET_PROGRESS_FIELDS).setServiceParent(top)
    TCPConnector(reactor, bridge, args.server, None, random.Random(args.seed)).setServiceParent(top)
    return run(reactor, top, args.duration)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
