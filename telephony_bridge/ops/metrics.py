"""Prometheus metrics: one registry per app (no module-level singletons), ``bridge_`` prefix, base units,
low-cardinality labels only (never a call SID). The registry also carries the standard ``process_*`` metrics
(``ProcessCollector``): ``process_cpu_seconds_total`` is how busy this process's one event loop keeps its core,
the figure that says when callers start to hear holes (README, Performance)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_LOOP_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # reads /proc/self at each scrape; nothing where there is no /proc
        self.calls_active = Gauge("bridge_calls_active", "Calls currently bridged", registry=r)
        self.draining = Gauge("bridge_draining", "1 from SIGTERM until the process exits", registry=r)
        self.calls = Counter(
            "bridge_calls_total", "Calls ended, by outcome and ingress", ["outcome", "ingress"], registry=r
        )
        self.call_duration = Histogram(
            "bridge_call_duration_seconds",
            "Length of bridged calls",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.ai_connect_latency = Histogram(
            "bridge_ai_connect_seconds",
            "From the call's start (Twilio's 'start'; SIP: our 200 OK) to the Savants session confirmed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_audio_latency = Histogram(
            "bridge_first_ai_audio_seconds",
            "From the call's start (Twilio's 'start'; SIP: our 200 OK) to the first AI audio sent to the caller",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_requests = Counter(
            "bridge_token_requests_total", "Savants token requests, by result code", ["result"], registry=r
        )
        self.token_no_budget = Counter(
            "bridge_token_no_budget_total",
            "Token requests not sent: the device had no budget left within the call's deadline",
            registry=r,
        )
        self.protocol_errors = Counter(
            "bridge_protocol_errors_total", "Malformed messages received, by peer", ["peer"], registry=r
        )
        self.inbound_dropped = Counter(
            "bridge_inbound_frames_dropped_total",
            "Caller frames dropped: late/duplicate, or over the pre-connect buffer",
            ["reason"],
            registry=r,
        )
        self.inbound_gap = Counter(
            "bridge_inbound_gap_fill_seconds_total", "Silence inserted for missing caller audio", registry=r
        )
        self.audio_seconds = Counter(
            "bridge_audio_seconds_total", "Audio carried, by direction", ["direction"], registry=r
        )
        self.dtmf = Counter("bridge_dtmf_total", "DTMF digits received", registry=r)
        self.ai_reconnects = Counter(
            "bridge_ai_reconnects_total",
            "Mid-call AI session drops, by what came of them: resumed, failed (deadline), not_retried, limited, "
            "abandoned (the call ended while reconnecting)",
            ["result"],
            registry=r,
        )
        self.ai_reconnect_attempts = Counter(
            "bridge_ai_reconnect_attempts_total", "Reconnect attempts to Savants (each one takes a token)", registry=r
        )
        self.ai_audio_overflow = Counter(
            "bridge_ai_audio_overflow_seconds_total",
            "AI audio dropped because more than audio.max_ai_ahead_s was queued for the caller",
            registry=r,
        )
        self.loop_lag = Histogram(
            "bridge_event_loop_lag_seconds",
            "How late the event loop woke a timer (sampled every 50 ms): beyond a frame, paced audio goes late",
            buckets=_LOOP_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "bridge_gc_pause_seconds",
            "How long each garbage collection stopped the process, by generation",
            ["generation"],
            buckets=_LOOP_BUCKETS,
            registry=r,
        )
        self.playout_underruns = Counter(
            "bridge_playout_underruns_total",
            "Holes in the caller's playback: the AI's frame came late (ai_late) or we sent late (scheduling)",
            ["cause"],
            registry=r,
        )
        self.prebuffer_changes = Counter(
            "bridge_playout_prebuffer_changes_total", "Adaptive prebuffer steps", ["direction"], registry=r
        )
        self.barge_ins = Counter("bridge_barge_in_total", "Caller interruptions of the AI", registry=r)
        self.paired_reads = Counter(
            "bridge_media_paired_reads_total",
            "Media streams paired (read two messages at a time: twilio.paired_reads), and let go for a quiet tick",
            ["change"],
            registry=r,
        )
        self.admission_refused = Counter(
            "bridge_admission_refused_total",
            "Twilio calls refused: no device could take them (webhook, stream), the replica is draining, or a "
            "replayed /voice (replay)",
            ["where"],
            registry=r,
        )

        self.signature_failures = Counter(
            "bridge_signature_failures_total",
            "Requests refused for a bad or missing X-Twilio-Signature",
            ["path"],
            registry=r,
        )
        self.stream_token_refused = Counter(
            "bridge_stream_token_refused_total",
            "Media streams closed for a missing, foreign or replayed stream token",
            registry=r,
        )
        self.webhook_answers = Counter(
            "bridge_webhook_answers_total", "TwiML documents served at /voice", ["document"], registry=r
        )
        self.stream_status = Counter(
            "bridge_stream_status_total", "Twilio stream status callbacks", ["event"], registry=r
        )
        self.client_quirks = Counter(
            "bridge_client_quirks_total",
            "Streams whose sender differs from Twilio (no_timestamps, stale_timestamps, frame_size), once per call",
            ["quirk"],
            registry=r,
        )
        self.streams_refused = Counter(
            "bridge_streams_refused_total",
            "Media streams closed at 'start' (duplicate_call_sid, unsupported_media_format)",
            ["reason"],
            registry=r,
        )
        self.webhooks_rejected = Counter(
            "bridge_webhooks_rejected_total",
            "Webhook requests that are not Twilio's (no_call_sid, content_type, empty_body), answered 400",
            ["reason"],
            registry=r,
        )
        self._outages: Callable[[], int] = lambda: 0
        r.register(_Outages(lambda: self._outages()))
        self.sip_refused = Counter(
            "bridge_sip_refused_total",
            "SIP INVITEs refused, by code (403 to sources and 482 to a reused Call-ID among them); not the core's "
            "400/405/420/501",
            ["code"],
            registry=r,
        )
        self.sip_setup = Histogram(
            "bridge_sip_setup_seconds",
            "SIP INVITE received to 200 OK sent",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.sip_rtp_packets = Counter(
            "bridge_sip_rtp_packets_total", "Caller RTP packets by fate (received, lost, late)", ["fate"], registry=r
        )
        self.sip_jitter = Histogram(
            "bridge_sip_jitter_seconds",
            "Interarrival jitter of the caller's RTP at the end of each SIP call (RFC 3550)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
            registry=r,
        )

    def watch_devices(
        self, device_ids: Sequence[str], max_calls: int, calls: Callable[[], Iterable[Mapping[str, Any]]]
    ) -> None:
        """Per-device load, read at scrape time from ``calls`` (the registry's snapshot): the pool is configured,
        so the ``device`` label stays low-cardinality, and every device shows, idle ones at 0."""
        limit = Gauge("bridge_device_call_limit", "Concurrent calls Savants allows per device", registry=self.registry)
        limit.set(max_calls)
        self.registry.register(_DeviceCalls(tuple(device_ids), calls))

    def watch_endpoints(self, up: Mapping[str, Callable[[], bool]]) -> None:
        """``bridge_savants_endpoint_up{endpoint}``: 1 while the Savants endpoint works, 0 while it fails (what
        ``/readyz`` judges, read at scrape time). A fleet whose replicas all say not ready gets no calls, so the
        call counters go quiet just when an alert is needed: this gauge is the one that shows it."""
        gauge = Gauge(
            "bridge_savants_endpoint_up",
            "1 while the Savants endpoint works, 0 while it fails (what /readyz judges)",
            ["endpoint"],
            registry=self.registry,
        )
        for endpoint, works in up.items():
            gauge.labels(endpoint).set_function(lambda works=works: float(works()))

    def count_outages(self, outages: Callable[[], int]) -> None:
        """``bridge_accounting_unavailable_total`` reads ``outages`` at scrape time: the backends count every
        request Redis did not answer (a heartbeat, a release, a status read), so an outage shows while calls go
        on, not only once a new call is refused for it."""
        self._outages = outages

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DeviceCalls(Collector):
    def __init__(self, device_ids: tuple[str, ...], calls: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self._device_ids = device_ids
        self._calls = calls

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "bridge_device_calls", "Calls this replica bridges now, by Savants device", labels=["device"]
        )
        counts = collections.Counter(call["device_id"] for call in self._calls())
        for device in self._device_ids:
            family.add_metric([device], counts.get(device, 0))
        yield family


class _Outages(Collector):
    def __init__(self, outages: Callable[[], int]) -> None:
        self._outages = outages

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "bridge_accounting_unavailable_total",
            "Requests to the shared accounting store (Redis) that it did not answer",
            value=self._outages(),
        )
