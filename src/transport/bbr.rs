//! BBR for quinn, with a minimum RTT that can grow back and ProbeRTT only when it is stale.
//!
//! This is quinn-proto 0.11.19's `congestion::bbr` (MIT OR Apache-2.0, itself a port of quiche's
//! `bbr_sender.cc`) with two changes. The first is the model: quinn's BBR takes its minimum RTT
//! from `RttEstimator::min()`, the connection's lifetime minimum, so its ten-second expiry re-reads
//! the same value: after the path delay grows (a route change, a link that was idle at 0 ms and is
//! now 25 ms away) the bandwidth-delay product, and the window with it, stay a few packets for the
//! connection's whole life. Here the minimum is a filter of this controller's own samples (ack time
//! − send time of each newly acknowledged packet, the least of one ACK frame being the RTT sample),
//! as in quiche and Linux: a lower sample replaces it at once, and after `MIN_RTT_EXPIRY` without
//! one the next sample replaces it whatever its value, whether or not the sender is
//! application-limited (a request/response sender nearly always is); a sample within a sixteenth of
//! the minimum confirms it (the queue was empty then).
//!
//! The second change is when ProbeRTT runs. The first ProbeRTT is quinn's: on the first ACK of
//! a sender that fills its window. That one matters more than it looks: quinn's STARTUP grows
//! the window by every byte acknowledged with no bound while the sender is
//! application-limited (its port compares the gain, not the window, with the target:
//! `cwnd_gain < target_window`, where quiche has `congestion_window_ < target_window`), and it
//! is the early ProbeRTT, with its small window, that makes the sender window-limited long
//! enough to find its full bandwidth and leave STARTUP. A first version of this file skipped
//! it: on a fresh connection, 32 concurrent 16 KiB responses over a 50 ms path went from one
//! RTT to two or three (`quicar bench --quick`, p50 55-61 ms against 111-173 ms), its window
//! grown to megabytes and its bursts lost. The comparison is a known bug with an open fix
//! upstream (quinn-rs/quinn#2798, which also admits app-limited samples that raise the
//! bandwidth estimate), to take with it, measured. After the first, quinn ran ProbeRTT ten
//! seconds after the last one began, whatever the samples said; here it runs as in Linux's
//! BBR: when the minimum has expired, never on the first ACK after the sender was idle (its
//! samples come from an empty queue and renew the minimum), and never while
//! application-limited. A sidecar's connection is idle between bursts of requests, and
//! quinn's schedule ran ProbeRTT on the first ACK of nearly every burst, at three quarters of
//! a bandwidth estimate that had decayed while idle: the lossy yardstick's QUIC p99 was 262
//! and 355 ms in rounds that began so, against 150-160 ms in rounds that did not
//! (BENCHMARKS.md, seventh session).
//!
//! quicar adds one thing: a connection to a peer whose path a closed connection measured less
//! than ten minutes ago starts where that one left off (`ResumedBbr`, from its `PathModel`:
//! bandwidth and minimum RTT), in ProbeBW with a window of one bandwidth-delay product, and so
//! without STARTUP or its first ProbeRTT, which held a new connection's first busy round trips
//! at a few packets (ARCHITECTURE.md, "A reconnect starts its congestion controller").
//!
//! The rest (startup, drain, the gain cycle, recovery, ACK aggregation) is quinn's, unchanged
//! but for its random generator (the sidecar's own, `crate::rng`).

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use bw_estimation::BandwidthEstimation;
use min_max::MinMax;

mod bw_estimation;
mod min_max;

/// The smallest datagram QUIC allows (RFC 9000 §14); quinn's initial windows count in it.
const BASE_DATAGRAM_SIZE: u64 = 1200;

/// How long a minimum RTT stands without a sample as low (quiche's and Linux's ten seconds).
const MIN_RTT_EXPIRY: Duration = Duration::from_secs(10);

/// How many rounds a resumed connection's bandwidth estimate stands under its own (BBR's
/// bandwidth filter window).
const RESUMED_ROUNDS: u64 = 10;

/// A sample within a sixteenth of the minimum RTT (3 ms of 50) confirms it.
const MIN_RTT_CONFIRM: u32 = 16;

/// BBR (v1, after quiche) with a windowed minimum RTT; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Bbr {
    config: Arc<BbrConfig>,
    current_mtu: u64,
    max_bandwidth: BandwidthEstimation,
    acked_bytes: u64,
    mode: Mode,
    loss_state: LossState,
    recovery_state: RecoveryState,
    recovery_window: u64,
    is_at_full_bandwidth: bool,
    pacing_gain: f32,
    high_gain: f32,
    drain_gain: f32,
    cwnd_gain: f32,
    high_cwnd_gain: f32,
    last_cycle_start: Option<Instant>,
    current_cycle_offset: u8,
    init_cwnd: u64,
    min_cwnd: u64,
    prev_in_flight_count: u64,
    exit_probe_rtt_at: Option<Instant>,
    probe_rtt_last_started_at: Option<Instant>,
    min_rtt: Duration,
    /// When `min_rtt` was last taken (or confirmed by ProbeRTT); `None` before the first sample,
    /// which replaces `min_rtt` whatever it is (zero, or a resumed connection's last model).
    min_rtt_stamp: Option<Instant>,
    /// The least RTT sample of the ACK frame being processed.
    sample_min_rtt: Option<Duration>,
    /// Packets the ACK frame being processed acknowledges for the first time.
    acked_packets: u32,
    /// Nothing was in flight after the last ACK: the next one is the first of a restart from
    /// idle, whose RTT samples come from an empty queue.
    idle: bool,
    exiting_quiescence: bool,
    pacing_rate: u64,
    max_acked_packet_number: u64,
    max_sent_packet_number: u64,
    end_recovery_at_packet_number: u64,
    cwnd: u64,
    current_round_trip_end_packet_number: u64,
    round_count: u64,
    bw_at_last_round: u64,
    round_wo_bw_gain: u64,
    ack_aggregation: AckAggregationState,
    /// The model of the last connection over the path, if this one started from it.
    resumed: Option<PathModel>,
}

impl Bbr {
    /// Construct a state using the given `config` and current time `now`
    pub(crate) fn new(config: Arc<BbrConfig>, current_mtu: u16) -> Self {
        let initial_window = config.initial_window;
        Self {
            config,
            current_mtu: current_mtu as u64,
            max_bandwidth: BandwidthEstimation::default(),
            acked_bytes: 0,
            mode: Mode::Startup,
            loss_state: Default::default(),
            recovery_state: RecoveryState::NotInRecovery,
            recovery_window: 0,
            is_at_full_bandwidth: false,
            pacing_gain: K_DEFAULT_HIGH_GAIN,
            high_gain: K_DEFAULT_HIGH_GAIN,
            drain_gain: 1.0 / K_DEFAULT_HIGH_GAIN,
            cwnd_gain: K_DEFAULT_HIGH_GAIN,
            high_cwnd_gain: K_DEFAULT_HIGH_GAIN,
            last_cycle_start: None,
            current_cycle_offset: 0,
            init_cwnd: initial_window,
            min_cwnd: calculate_min_window(current_mtu as u64),
            prev_in_flight_count: 0,
            exit_probe_rtt_at: None,
            probe_rtt_last_started_at: None,
            min_rtt: Default::default(),
            min_rtt_stamp: None,
            sample_min_rtt: None,
            acked_packets: 0,
            idle: false,
            exiting_quiescence: false,
            pacing_rate: 0,
            max_acked_packet_number: 0,
            max_sent_packet_number: 0,
            end_recovery_at_packet_number: 0,
            cwnd: initial_window,
            current_round_trip_end_packet_number: 0,
            round_count: 0,
            bw_at_last_round: 0,
            round_wo_bw_gain: 0,
            ack_aggregation: AckAggregationState::default(),
            resumed: None,
        }
    }

    /// A controller that starts where a connection over the same path left off: in ProbeBW
    /// at `model`'s bandwidth, its window one bandwidth-delay product (growing to ProbeBW's
    /// two as ACKs come), and no ProbeRTT before its minimum RTT expires (a new connection's
    /// first, quinn's, is what ends STARTUP, which this one skips). The model's minimum RTT
    /// sizes the first window only: the connection's first RTT sample replaces it, as in a
    /// fresh connection, so a path whose delay has grown since is not held to the old, small
    /// bandwidth-delay product until the minimum expires.
    fn resumed(config: Arc<BbrConfig>, current_mtu: u16, model: PathModel, now: Instant) -> Self {
        let mut bbr = Self::new(config, current_mtu);
        bbr.max_bandwidth.resume(model.bandwidth, RESUMED_ROUNDS);
        bbr.resumed = Some(model);
        bbr.min_rtt = model.min_rtt;
        bbr.probe_rtt_last_started_at = Some(now);
        bbr.is_at_full_bandwidth = true;
        bbr.enter_probe_bandwidth_mode(now);
        bbr.cwnd = bbr.get_target_cwnd(1.0).max(bbr.init_cwnd);
        bbr.calculate_pacing_rate();
        bbr
    }

    /// What this controller knows of its path: what it measured itself once it has left
    /// STARTUP (a model from STARTUP would be a guess), or else the model it was resumed from
    /// (a connection that was application-limited throughout measures no bandwidth).
    fn path_model(&self) -> Option<PathModel> {
        let bandwidth = self.max_bandwidth.measured();
        if self.is_at_full_bandwidth && bandwidth > 0 && self.min_rtt_stamp.is_some() {
            return Some(PathModel {
                bandwidth,
                min_rtt: self.min_rtt,
                measured: None,
            });
        }
        self.resumed
    }

    fn enter_startup_mode(&mut self) {
        self.mode = Mode::Startup;
        self.pacing_gain = self.high_gain;
        self.cwnd_gain = self.high_cwnd_gain;
    }

    fn enter_probe_bandwidth_mode(&mut self, now: Instant) {
        self.mode = Mode::ProbeBw;
        self.cwnd_gain = K_DERIVED_HIGH_CWNDGAIN;
        self.last_cycle_start = Some(now);
        // Pick a random offset for the gain cycle out of {0, 2..7} range. 1 is
        // excluded because in that case increased gain and decreased gain would not
        // follow each other.
        let mut rand_index = (crate::rng::random_u64() % (K_PACING_GAIN.len() as u64 - 1)) as u8;
        if rand_index >= 1 {
            rand_index += 1;
        }
        self.current_cycle_offset = rand_index;
        self.pacing_gain = K_PACING_GAIN[rand_index as usize];
    }

    fn update_recovery_state(&mut self, is_round_start: bool) {
        // Exit recovery when there are no losses for a round.
        if self.loss_state.has_losses() {
            self.end_recovery_at_packet_number = self.max_sent_packet_number;
        }
        match self.recovery_state {
            // Enter conservation on the first loss.
            RecoveryState::NotInRecovery if self.loss_state.has_losses() => {
                self.recovery_state = RecoveryState::Conservation;
                // This will cause the |recovery_window| to be set to the
                // correct value in CalculateRecoveryWindow().
                self.recovery_window = 0;
                // Since the conservation phase is meant to be lasting for a whole
                // round, extend the current round as if it were started right now.
                self.current_round_trip_end_packet_number = self.max_sent_packet_number;
            }
            RecoveryState::Growth | RecoveryState::Conservation => {
                if self.recovery_state == RecoveryState::Conservation && is_round_start {
                    self.recovery_state = RecoveryState::Growth;
                }
                // Exit recovery if appropriate.
                if !self.loss_state.has_losses()
                    && self.max_acked_packet_number > self.end_recovery_at_packet_number
                {
                    self.recovery_state = RecoveryState::NotInRecovery;
                }
            }
            _ => {}
        }
    }

    fn update_gain_cycle_phase(&mut self, now: Instant, in_flight: u64) {
        // In most cases, the cycle is advanced after an RTT passes.
        let mut should_advance_gain_cycling = self
            .last_cycle_start
            .map(|last_cycle_start| now.duration_since(last_cycle_start) > self.min_rtt)
            .unwrap_or(false);
        // If the pacing gain is above 1.0, the connection is trying to probe the
        // bandwidth by increasing the number of bytes in flight to at least
        // pacing_gain * BDP.  Make sure that it actually reaches the target, as
        // long as there are no losses suggesting that the buffers are not able to
        // hold that much.
        if self.pacing_gain > 1.0
            && !self.loss_state.has_losses()
            && self.prev_in_flight_count < self.get_target_cwnd(self.pacing_gain)
        {
            should_advance_gain_cycling = false;
        }

        // If pacing gain is below 1.0, the connection is trying to drain the extra
        // queue which could have been incurred by probing prior to it.  If the
        // number of bytes in flight falls down to the estimated BDP value earlier,
        // conclude that the queue has been successfully drained and exit this cycle
        // early.
        if self.pacing_gain < 1.0 && in_flight <= self.get_target_cwnd(1.0) {
            should_advance_gain_cycling = true;
        }

        if should_advance_gain_cycling {
            self.current_cycle_offset = (self.current_cycle_offset + 1) % K_PACING_GAIN.len() as u8;
            self.last_cycle_start = Some(now);
            // Stay in low gain mode until the target BDP is hit.  Low gain mode
            // will be exited immediately when the target BDP is achieved.
            if DRAIN_TO_TARGET
                && self.pacing_gain < 1.0
                && (K_PACING_GAIN[self.current_cycle_offset as usize] - 1.0).abs() < f32::EPSILON
                && in_flight > self.get_target_cwnd(1.0)
            {
                return;
            }
            self.pacing_gain = K_PACING_GAIN[self.current_cycle_offset as usize];
        }
    }

    fn maybe_exit_startup_or_drain(&mut self, now: Instant, in_flight: u64) {
        if self.mode == Mode::Startup && self.is_at_full_bandwidth {
            self.mode = Mode::Drain;
            self.pacing_gain = self.drain_gain;
            self.cwnd_gain = self.high_cwnd_gain;
        }
        if self.mode == Mode::Drain && in_flight <= self.get_target_cwnd(1.0) {
            self.enter_probe_bandwidth_mode(now);
        }
    }

    /// Takes the ACK frame's RTT sample into the minimum-RTT filter: a lower sample replaces
    /// the minimum, and so does any sample once the minimum is `MIN_RTT_EXPIRY` old, unless
    /// its ACK may have been delayed; a sample within `MIN_RTT_CONFIRM` of the minimum confirms
    /// it (the queue was empty then, so the minimum is still the path's). Returns whether the
    /// minimum had expired before this ACK.
    ///
    /// A receiver acknowledges every second packet at once and a lone one after up to its
    /// `max_ack_delay` (25 ms by default), so a frame that acknowledges one packet may carry
    /// that delay: as Linux's BBR does with a delayed ACK, such a sample never replaces an
    /// expired minimum (it still lowers one). On an idle connection the keep-alive's PINGs are
    /// all lone packets: their samples, the RTT plus the peer's ACK delay (76 ms on a 50 ms
    /// path in the lossy yardstick), replaced the minimum ten seconds after the last request,
    /// and the path model the next connection starts from said 76 ms.
    fn update_min_rtt(&mut self, now: Instant) -> bool {
        let expired = self
            .min_rtt_stamp
            .is_some_and(|stamp| now.saturating_duration_since(stamp) > MIN_RTT_EXPIRY);
        let undelayed = std::mem::take(&mut self.acked_packets) > 1;
        let Some(sample) = self.sample_min_rtt.take() else {
            return expired;
        };
        if (expired && undelayed) || self.min_rtt_stamp.is_none() || sample < self.min_rtt {
            self.min_rtt = sample;
            self.min_rtt_stamp = Some(now);
        } else if sample <= self.min_rtt + self.min_rtt / MIN_RTT_CONFIRM {
            self.min_rtt_stamp = Some(now);
        }
        expired
    }

    /// When ProbeRTT runs. The first: on the first ACK of a sender that fills its window
    /// (quinn's, see the module documentation). After it, as in Linux's BBR: when the minimum
    /// RTT expired (ten seconds without a sample that low or confirming it), never on the
    /// first ACK after idle (its samples come from an empty queue and renew the minimum) and
    /// never while application-limited (such a sender builds no queue of its own). quinn ran it
    /// ten seconds after the last one began whatever the samples said: a connection idle
    /// between bursts of requests ran it at the start of nearly every burst, at a window of
    /// three quarters of a bandwidth estimate that had decayed while idle, and held the burst
    /// for 200 ms and more.
    fn is_probe_rtt_due(&self, expired: bool, restart: bool, app_limited: bool) -> bool {
        if app_limited {
            return false;
        }
        match self.probe_rtt_last_started_at {
            None => true,
            Some(_) => expired && !restart,
        }
    }

    fn maybe_enter_or_exit_probe_rtt(
        &mut self,
        now: Instant,
        is_round_start: bool,
        bytes_in_flight: u64,
        app_limited: bool,
        (expired, restart): (bool, bool),
    ) {
        if self.is_probe_rtt_due(expired, restart, app_limited)
            && !self.exiting_quiescence
            && self.mode != Mode::ProbeRtt
        {
            self.mode = Mode::ProbeRtt;
            self.pacing_gain = 1.0;
            // Do not decide on the time to exit ProbeRtt until the
            // |bytes_in_flight| is at the target small value.
            self.exit_probe_rtt_at = None;
            self.probe_rtt_last_started_at = Some(now);
        }

        if self.mode == Mode::ProbeRtt {
            match self.exit_probe_rtt_at {
                None => {
                    // If the window has reached the appropriate size, schedule exiting
                    // ProbeRtt.  The CWND during ProbeRtt is
                    // kMinimumCongestionWindow, but we allow an extra packet since QUIC
                    // checks CWND before sending a packet.
                    if bytes_in_flight < self.get_probe_rtt_cwnd() + self.current_mtu {
                        const K_PROBE_RTT_TIME: Duration = Duration::from_millis(200);
                        self.exit_probe_rtt_at = Some(now + K_PROBE_RTT_TIME);
                    }
                }
                Some(exit_time) if is_round_start && now >= exit_time => {
                    // The samples taken with the queue drained confirm the minimum.
                    self.min_rtt_stamp = Some(now);
                    if !self.is_at_full_bandwidth {
                        self.enter_startup_mode();
                    } else {
                        self.enter_probe_bandwidth_mode(now);
                    }
                }
                Some(_) => {}
            }
        }

        self.exiting_quiescence = false;
    }

    fn get_target_cwnd(&self, gain: f32) -> u64 {
        let bw = self.max_bandwidth.get_estimate();
        let bdp = self.min_rtt.as_micros() as u64 * bw;
        let bdpf = bdp as f64;
        let cwnd = ((gain as f64 * bdpf) / 1_000_000f64) as u64;
        // BDP estimate will be zero if no bandwidth samples are available yet.
        if cwnd == 0 {
            return self.init_cwnd;
        }
        cwnd.max(self.min_cwnd)
    }

    fn get_probe_rtt_cwnd(&self) -> u64 {
        const K_MODERATE_PROBE_RTT_MULTIPLIER: f32 = 0.75;
        if PROBE_RTT_BASED_ON_BDP {
            return self.get_target_cwnd(K_MODERATE_PROBE_RTT_MULTIPLIER);
        }
        self.min_cwnd
    }

    fn calculate_pacing_rate(&mut self) {
        let bw = self.max_bandwidth.get_estimate();
        if bw == 0 {
            return;
        }
        let target_rate = (bw as f64 * self.pacing_gain as f64) as u64;
        if self.is_at_full_bandwidth {
            self.pacing_rate = target_rate;
            return;
        }

        // Pace at the rate of initial_window / RTT as soon as RTT measurements are
        // available.
        if self.pacing_rate == 0 && self.min_rtt.as_nanos() != 0 {
            self.pacing_rate =
                BandwidthEstimation::bw_from_delta(self.init_cwnd, self.min_rtt).unwrap();
            return;
        }

        // Do not decrease the pacing rate during startup.
        if self.pacing_rate < target_rate {
            self.pacing_rate = target_rate;
        }
    }

    fn calculate_cwnd(&mut self, bytes_acked: u64, excess_acked: u64) {
        if self.mode == Mode::ProbeRtt {
            return;
        }
        let mut target_window = self.get_target_cwnd(self.cwnd_gain);
        if self.is_at_full_bandwidth {
            // Add the max recently measured ack aggregation to CWND.
            target_window += self.ack_aggregation.max_ack_height.get();
        } else {
            // Add the most recent excess acked.  Because CWND never decreases in
            // STARTUP, this will automatically create a very localized max filter.
            target_window += excess_acked;
        }
        // Instead of immediately setting the target CWND as the new one, BBR grows
        // the CWND towards |target_window| by only increasing it |bytes_acked| at a
        // time.
        if self.is_at_full_bandwidth {
            self.cwnd = target_window.min(self.cwnd + bytes_acked);
        } else if (self.cwnd_gain < target_window as f32) || (self.acked_bytes < self.init_cwnd) {
            // If the connection is not yet out of startup phase, do not decrease
            // the window.
            self.cwnd += bytes_acked;
        }

        // Enforce the limits on the congestion window.
        if self.cwnd < self.min_cwnd {
            self.cwnd = self.min_cwnd;
        }
    }

    fn calculate_recovery_window(&mut self, bytes_acked: u64, bytes_lost: u64, in_flight: u64) {
        if !self.recovery_state.in_recovery() {
            return;
        }
        // Set up the initial recovery window.
        if self.recovery_window == 0 {
            self.recovery_window = self.min_cwnd.max(in_flight + bytes_acked);
            return;
        }

        // Remove losses from the recovery window, while accounting for a potential
        // integer underflow.
        if self.recovery_window >= bytes_lost {
            self.recovery_window -= bytes_lost;
        } else {
            // k_max_segment_size = current_mtu
            self.recovery_window = self.current_mtu;
        }
        // In CONSERVATION mode, just subtracting losses is sufficient.  In GROWTH,
        // release additional |bytes_acked| to achieve a slow-start-like behavior.
        if self.recovery_state == RecoveryState::Growth {
            self.recovery_window += bytes_acked;
        }

        // Sanity checks.  Ensure that we always allow to send at least an MSS or
        // |bytes_acked| in response, whichever is larger.
        self.recovery_window = self
            .recovery_window
            .max(in_flight + bytes_acked)
            .max(self.min_cwnd);
    }

    /// One newly acknowledged packet (quinn's `on_ack` without the estimator, which this
    /// controller does not read).
    fn on_packet_acked(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.max_bandwidth
            .on_ack(now, sent, bytes, self.round_count, app_limited);
        self.acked_bytes += bytes;
        self.acked_packets += 1;
        let sample = now.saturating_duration_since(sent);
        if !sample.is_zero() && self.sample_min_rtt.is_none_or(|least| sample < least) {
            self.sample_min_rtt = Some(sample);
        }
    }

    /// <https://datatracker.ietf.org/doc/html/draft-cardwell-iccrg-bbr-congestion-control#section-4.3.2.2>
    fn check_if_full_bw_reached(&mut self, app_limited: bool) {
        if app_limited {
            return;
        }
        let target = (self.bw_at_last_round as f64 * K_STARTUP_GROWTH_TARGET as f64) as u64;
        let bw = self.max_bandwidth.get_estimate();
        if bw >= target {
            self.bw_at_last_round = bw;
            self.round_wo_bw_gain = 0;
            self.ack_aggregation.max_ack_height.reset();
            return;
        }

        self.round_wo_bw_gain += 1;
        if self.round_wo_bw_gain >= K_ROUND_TRIPS_WITHOUT_GROWTH_BEFORE_EXITING_STARTUP as u64
            || (self.recovery_state.in_recovery())
        {
            self.is_at_full_bandwidth = true;
        }
    }
}

impl Controller for Bbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.max_sent_packet_number = last_packet_number;
        self.max_bandwidth.on_sent(now, bytes);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.on_packet_acked(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        let bytes_acked = self.max_bandwidth.bytes_acked_this_window();
        let excess_acked = self.ack_aggregation.update_ack_aggregation_bytes(
            bytes_acked,
            now,
            self.round_count,
            self.max_bandwidth.get_estimate(),
        );
        self.max_bandwidth.end_acks(self.round_count, app_limited);
        if let Some(largest_acked_packet) = largest_packet_num_acked {
            self.max_acked_packet_number = largest_acked_packet;
        }

        let expired = self.update_min_rtt(now);
        let restart = std::mem::replace(&mut self.idle, in_flight == 0);

        let mut is_round_start = false;
        if bytes_acked > 0 {
            is_round_start =
                self.max_acked_packet_number > self.current_round_trip_end_packet_number;
            if is_round_start {
                self.current_round_trip_end_packet_number = self.max_sent_packet_number;
                self.round_count += 1;
            }
        }

        self.update_recovery_state(is_round_start);

        if self.mode == Mode::ProbeBw {
            self.update_gain_cycle_phase(now, in_flight);
        }

        if is_round_start && !self.is_at_full_bandwidth {
            self.check_if_full_bw_reached(app_limited);
        }

        self.maybe_exit_startup_or_drain(now, in_flight);

        self.maybe_enter_or_exit_probe_rtt(
            now,
            is_round_start,
            in_flight,
            app_limited,
            (expired, restart),
        );

        // After the model is updated, recalculate the pacing rate and congestion window.
        self.calculate_pacing_rate();
        self.calculate_cwnd(bytes_acked, excess_acked);
        self.calculate_recovery_window(bytes_acked, self.loss_state.lost_bytes, in_flight);

        // Each ACK's state, for `QUICAR_LOG=quicar::transport::bbr=trace` (how the stalls in
        // the module documentation were found).
        tracing::trace!(
            mode = ?self.mode,
            recovery = ?self.recovery_state,
            cwnd = self.cwnd,
            recovery_window = self.recovery_window,
            window = self.window(),
            in_flight,
            lost = self.loss_state.lost_bytes,
            acked = bytes_acked,
            min_rtt = ?self.min_rtt,
            bw = self.max_bandwidth.get_estimate(),
            app_limited,
            round = self.round_count,
        );
        self.prev_in_flight_count = in_flight;
        self.loss_state.reset();
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        _is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.loss_state.lost_bytes += lost_bytes;
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.current_mtu = new_mtu as u64;
        self.min_cwnd = calculate_min_window(self.current_mtu);
        self.init_cwnd = self.config.initial_window.max(self.min_cwnd);
        self.cwnd = self.cwnd.max(self.min_cwnd);
    }

    fn window(&self) -> u64 {
        if self.mode == Mode::ProbeRtt {
            return self.get_probe_rtt_cwnd();
        } else if self.recovery_state.in_recovery() && self.mode != Mode::Startup {
            return self.cwnd.min(self.recovery_window);
        }
        self.cwnd
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.pacing_rate = Some(self.pacing_rate * 8);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.config.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Configuration for the [`Bbr`] congestion controller
#[derive(Debug, Clone)]
pub(crate) struct BbrConfig {
    initial_window: u64,
}

impl Default for BbrConfig {
    fn default() -> Self {
        Self {
            initial_window: K_MAX_INITIAL_CONGESTION_WINDOW * BASE_DATAGRAM_SIZE,
        }
    }
}

impl ControllerFactory for BbrConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr::new(self, current_mtu))
    }
}

/// What a connection's BBR learnt of its path, for the next connection to the same peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathModel {
    /// Bytes per second: the bandwidth filter's maximum.
    bandwidth: u64,
    min_rtt: Duration,
    /// When it was measured: when the connection that measured it ended (`None` until then).
    /// A model carried on by a connection that measured nothing itself keeps its time, so that
    /// `PATH_MODEL_AGE` bounds how old a model can be, not how old its last carrier was.
    measured: Option<Instant>,
}

impl PathModel {
    /// The model of the controller of `conn`, if it is ours and has one (`Bbr::path_model`),
    /// as `conn` ends.
    pub(crate) fn of(conn: &quinn::Connection) -> Option<Self> {
        let state = conn.congestion_state().into_any().downcast::<Bbr>().ok()?;
        let mut model = state.path_model()?;
        model.measured.get_or_insert_with(Instant::now);
        Some(model)
    }

    /// When the model was measured (`None` for one its connection still holds).
    pub(crate) fn measured(&self) -> Option<Instant> {
        self.measured
    }

    /// Bytes per second.
    pub(crate) fn bandwidth(&self) -> u64 {
        self.bandwidth
    }

    pub(crate) fn min_rtt(&self) -> Duration {
        self.min_rtt
    }
}

#[cfg(test)]
impl PathModel {
    pub(crate) fn for_tests(bandwidth: u64, min_rtt: Duration, measured: Instant) -> Self {
        Self {
            bandwidth,
            min_rtt,
            measured: Some(measured),
        }
    }
}

/// The controller factory of a connection to a peer whose last connection left `model`:
/// `Bbr::resumed` (see the module documentation).
#[derive(Debug)]
pub(crate) struct ResumedBbr {
    config: Arc<BbrConfig>,
    model: PathModel,
}

impl ResumedBbr {
    pub(crate) fn new(model: PathModel) -> Self {
        Self {
            config: Arc::default(),
            model,
        }
    }
}

impl ControllerFactory for ResumedBbr {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr::resumed(
            self.config.clone(),
            current_mtu,
            self.model,
            now,
        ))
    }
}

#[derive(Debug, Default, Copy, Clone)]
struct AckAggregationState {
    max_ack_height: MinMax,
    aggregation_epoch_start_time: Option<Instant>,
    aggregation_epoch_bytes: u64,
}

impl AckAggregationState {
    fn update_ack_aggregation_bytes(
        &mut self,
        newly_acked_bytes: u64,
        now: Instant,
        round: u64,
        max_bandwidth: u64,
    ) -> u64 {
        // Compute how many bytes are expected to be delivered, assuming max
        // bandwidth is correct.
        let expected_bytes_acked = max_bandwidth
            * now
                .saturating_duration_since(self.aggregation_epoch_start_time.unwrap_or(now))
                .as_micros() as u64
            / 1_000_000;

        // Reset the current aggregation epoch as soon as the ack arrival rate is
        // less than or equal to the max bandwidth.
        if self.aggregation_epoch_bytes <= expected_bytes_acked {
            // Reset to start measuring a new aggregation epoch.
            self.aggregation_epoch_bytes = newly_acked_bytes;
            self.aggregation_epoch_start_time = Some(now);
            return 0;
        }

        // Compute how many extra bytes were delivered vs max bandwidth.
        // Include the bytes most recently acknowledged to account for stretch acks.
        self.aggregation_epoch_bytes += newly_acked_bytes;
        let diff = self.aggregation_epoch_bytes - expected_bytes_acked;
        self.max_ack_height.update_max(round, diff);
        diff
    }
}

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Mode {
    // Startup phase of the connection.
    Startup,
    // After achieving the highest possible bandwidth during the startup, lower
    // the pacing rate in order to drain the queue.
    Drain,
    // Cruising mode.
    ProbeBw,
    // Temporarily slow down sending in order to empty the buffer and measure
    // the real minimum RTT.
    ProbeRtt,
}

// Indicates how the congestion control limits the amount of bytes in flight.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum RecoveryState {
    // Do not limit.
    NotInRecovery,
    // Allow an extra outstanding byte for each byte acknowledged.
    Conservation,
    // Allow two extra outstanding bytes for each byte acknowledged (slow
    // start).
    Growth,
}

impl RecoveryState {
    pub(super) fn in_recovery(&self) -> bool {
        !matches!(self, Self::NotInRecovery)
    }
}

#[derive(Debug, Clone, Default)]
struct LossState {
    lost_bytes: u64,
}

impl LossState {
    pub(super) fn reset(&mut self) {
        self.lost_bytes = 0;
    }

    pub(super) fn has_losses(&self) -> bool {
        self.lost_bytes != 0
    }
}

fn calculate_min_window(current_mtu: u64) -> u64 {
    4 * current_mtu
}

// The gain used for the STARTUP, equal to 2/ln(2).
const K_DEFAULT_HIGH_GAIN: f32 = 2.885;
// The newly derived CWND gain for STARTUP, 2.
const K_DERIVED_HIGH_CWNDGAIN: f32 = 2.0;
// The cycle of gains used during the ProbeBw stage.
const K_PACING_GAIN: [f32; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];

const K_STARTUP_GROWTH_TARGET: f32 = 1.25;
const K_ROUND_TRIPS_WITHOUT_GROWTH_BEFORE_EXITING_STARTUP: u8 = 3;

// Do not allow initial congestion window to be greater than 200 packets.
const K_MAX_INITIAL_CONGESTION_WINDOW: u64 = 200;

const PROBE_RTT_BASED_ON_BDP: bool = true;
const DRAIN_TO_TARGET: bool = true;

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1452;

    /// A sender on a path whose round-trip time the test sets: each round sends eight full
    /// datagrams and has them all acknowledged one RTT later in one ACK frame.
    struct Sender {
        bbr: Bbr,
        t0: Instant,
        now: Instant,
        pn: u64,
        app_limited: bool,
        /// Bytes left in flight after each ACK (0: the sender drains every round).
        in_flight: u64,
        /// ProbeRTT entries seen by `rounds`.
        probes: usize,
    }

    impl Sender {
        fn new(app_limited: bool) -> Self {
            let t0 = Instant::now();
            Self {
                bbr: Bbr::new(Arc::new(BbrConfig::default()), MTU),
                t0,
                now: t0,
                pn: 0,
                app_limited,
                in_flight: 0,
                probes: 0,
            }
        }

        /// Rounds of `rtt` until `until` after the start (at least one).
        fn rounds(&mut self, rtt: Duration, until: Duration) -> &Bbr {
            self.rounds_of(8, rtt, until)
        }

        /// Rounds of `packets` datagrams each, acknowledged `rtt` later in one frame.
        fn rounds_of(&mut self, packets: usize, rtt: Duration, until: Duration) -> &Bbr {
            let bytes = u64::from(MTU);
            loop {
                let sent = self.now;
                for _ in 0..packets {
                    self.pn += 1;
                    self.bbr.on_sent(sent, bytes, self.pn);
                }
                self.now += rtt;
                for _ in 0..packets {
                    self.bbr
                        .on_packet_acked(self.now, sent, bytes, self.app_limited);
                }
                let before = self.bbr.mode;
                self.bbr
                    .on_end_acks(self.now, self.in_flight, self.app_limited, Some(self.pn));
                if self.bbr.mode == Mode::ProbeRtt && before != Mode::ProbeRtt {
                    self.probes += 1;
                }
                if self.now >= self.t0 + until {
                    return &self.bbr;
                }
            }
        }
    }

    /// A busy sender (`busy`) on a connection that starts from `model`.
    fn resumed(model: PathModel) -> Sender {
        let mut path = busy();
        path.bbr = Bbr::resumed(Arc::default(), MTU, model, path.t0);
        path
    }

    const FAST: Duration = Duration::from_millis(1);
    const SLOW: Duration = Duration::from_millis(50);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_minimum_rtt_grows_back_after_the_path_delay_jumps_but_not_before_it_expires() {
        for app_limited in [false, true] {
            let mut path = Sender::new(app_limited);
            assert_eq!(path.rounds(FAST, secs(2)).min_rtt, FAST, "{app_limited}");
            // The delay jumps: nine seconds on, the old minimum still stands (a queue that
            // builds for a while must not raise it)...
            assert_eq!(path.rounds(SLOW, secs(11)).min_rtt, FAST, "{app_limited}");
            // ...and once ten seconds pass without a sample as low, the path's RTT replaces it
            // (quinn's BBR kept the connection's lifetime minimum, 1 ms, for ever).
            assert_eq!(path.rounds(SLOW, secs(13)).min_rtt, SLOW, "{app_limited}");
            // A lower sample is taken at once.
            assert_eq!(
                path.rounds(FAST, Duration::ZERO).min_rtt,
                FAST,
                "{app_limited}"
            );
        }
    }

    /// Failure scope of the minimum that grows back: an idle connection's keep-alives, each a
    /// lone packet acknowledged after the peer's ACK delay, do not replace an expired minimum
    /// (they did: the lossy yardstick's path models said 76 ms for a 50 ms path); the first
    /// frame acknowledging several packets after that does, and a lone packet's lower sample
    /// still lowers it at once.
    #[test]
    fn lone_packets_acknowledged_late_do_not_replace_an_expired_minimum() {
        let delayed = SLOW + Duration::from_millis(25);
        let longer = SLOW + Duration::from_millis(10);
        for app_limited in [false, true] {
            let mut path = Sender::new(app_limited);
            assert_eq!(path.rounds(SLOW, secs(2)).min_rtt, SLOW);
            // Twenty seconds of keep-alives: the minimum expires, and stands.
            let idle = path.rounds_of(1, delayed, secs(22)).min_rtt;
            assert_eq!(idle, SLOW, "{app_limited}");
            // Requests again, on a path now 10 ms longer: the first busy frame replaces it.
            let busy = path.rounds_of(2, longer, Duration::ZERO).min_rtt;
            assert_eq!(busy, longer, "{app_limited}");
            let lower = path.rounds_of(1, FAST, Duration::ZERO).min_rtt;
            assert_eq!(lower, FAST, "{app_limited}");
        }
    }

    #[test]
    fn the_window_follows_the_new_bandwidth_delay_product_after_a_delay_jump() {
        let mut path = Sender::new(false);
        let before = path.rounds(FAST, secs(2)).get_target_cwnd(1.0);
        let after = path.rounds(SLOW, secs(13)).get_target_cwnd(1.0);
        // Same bandwidth estimate (eight datagrams a round), fifty times the RTT: the
        // bandwidth-delay product is no longer the 1 ms one.
        assert!(
            after > before,
            "target window {after} after the jump, {before} before"
        );
    }

    #[test]
    fn probe_rtt_runs_on_quinns_schedule_and_does_not_reset_the_minimum() {
        // Window-limited from the first ACK: ProbeRTT at once (what gets a fresh connection out
        // of STARTUP, see the module documentation), and the minimum stays the path's.
        let rtt = Duration::from_millis(20);
        let mut path = Sender::new(false);
        let t0 = path.t0;
        let bbr = path.rounds(rtt, Duration::ZERO);
        assert_eq!(bbr.mode, Mode::ProbeRtt);
        assert_eq!(bbr.min_rtt, rtt);
        assert_eq!(bbr.probe_rtt_last_started_at, Some(t0 + rtt));
    }

    #[test]
    fn probe_rtt_is_entered_only_by_a_sender_that_fills_its_window() {
        for (app_limited, probes) in [(false, true), (true, false)] {
            let mut path = Sender::new(app_limited);
            let rtt = Duration::from_millis(20);
            let mut seen = false;
            for round in 1..=600 {
                seen |= path.rounds(rtt, rtt * round).mode == Mode::ProbeRtt;
            }
            assert_eq!(seen, probes, "app-limited {app_limited}");
        }
    }

    /// A sender that fills its window (something always left in flight after an ACK).
    fn busy() -> Sender {
        let mut path = Sender::new(false);
        path.in_flight = 8 * u64::from(MTU);
        path
    }

    #[test]
    fn samples_at_the_minimum_confirm_it_so_a_busy_sender_probes_the_rtt_once() {
        // Thirty seconds at the same RTT: the first ProbeRTT only. quinn's schedule ran one
        // every ten seconds whatever the samples said.
        let mut path = busy();
        path.rounds(Duration::from_millis(20), secs(30));
        assert_eq!(path.probes, 1);
    }

    #[test]
    fn a_standing_queue_still_gets_probe_rtt() {
        // The RTT samples double (a queue the sender keeps full) and stay there: ten seconds
        // on, the minimum has expired and ProbeRTT drains the queue to measure it again.
        let mut path = busy();
        path.rounds(Duration::from_millis(20), secs(2));
        assert_eq!(path.probes, 1);
        path.rounds(Duration::from_millis(40), secs(9));
        assert_eq!(path.probes, 1, "not before the minimum expires");
        path.rounds(Duration::from_millis(40), secs(14));
        assert_eq!(path.probes, 2, "once it has");
    }

    #[test]
    fn a_burst_after_idle_does_not_start_with_probe_rtt() {
        // A connection between bursts of requests: busy, idle for thirty seconds (its last
        // ACK leaves nothing in flight), busy again. quinn's schedule ran ProbeRTT on the
        // burst's first ACK (ten seconds since the last one) and held the burst at a small
        // window for 200 ms and more.
        let rtt = Duration::from_millis(20);
        let mut path = busy();
        path.rounds(rtt, secs(2));
        assert_eq!(path.probes, 1);
        path.in_flight = 0;
        path.rounds(rtt, Duration::ZERO);
        path.now += secs(30);
        path.in_flight = 8 * u64::from(MTU);
        assert_eq!(path.rounds(rtt, secs(37)).min_rtt, rtt);
        assert_eq!(path.probes, 1);
    }

    #[test]
    fn a_connection_over_a_known_path_starts_where_the_last_one_left_off() {
        let rtt = Duration::from_millis(20);
        let mut last = busy();
        assert_eq!(last.bbr.path_model(), None, "nothing measured yet");
        last.rounds(rtt, Duration::ZERO);
        assert_eq!(last.bbr.path_model(), None, "still in STARTUP: a guess");
        last.rounds(rtt, secs(2));
        let model = last.bbr.path_model().expect("left STARTUP");
        assert_eq!(model.min_rtt, rtt);

        // The next connection: no STARTUP, and its window is the path's bandwidth-delay product
        // from the first packet, where a fresh one starts from the initial window.
        let mut next = resumed(model);
        assert_eq!(next.bbr.mode, Mode::ProbeBw);
        let bdp = model.bandwidth * rtt.as_micros() as u64 / 1_000_000;
        assert_eq!(next.bbr.window(), bdp.max(next.bbr.init_cwnd));
        assert_eq!(
            next.bbr.pacing_rate,
            (model.bandwidth as f32 * next.bbr.pacing_gain) as u64
        );
        // No ProbeRTT on its first window-limited ACK (a fresh connection's first, which is what
        // ends its STARTUP) nor for the next ten seconds, and it still knows the path as well.
        next.rounds(rtt, secs(9));
        assert_eq!(next.probes, 0);
        assert_eq!(next.bbr.path_model(), Some(model));
    }

    #[test]
    fn a_model_from_a_path_whose_delay_has_since_grown_gives_way_to_the_first_sample() {
        let mut last = busy();
        last.rounds(FAST, secs(2));
        let model = last.bbr.path_model().expect("left STARTUP");
        let mut next = resumed(model);
        // The path is now fifty times slower. The first RTT sample is the new minimum, so the
        // window is the new path's bandwidth-delay product from the first ACK, where an old
        // minimum that stood until it expired would hold it at a fiftieth of that for ten
        // seconds (the fifth session's delay jump, BENCHMARKS.md).
        next.rounds(SLOW, Duration::ZERO);
        assert_eq!(next.bbr.min_rtt, SLOW);
        let bdp = model.bandwidth * SLOW.as_micros() as u64 / 1_000_000;
        assert!(next.bbr.get_target_cwnd(1.0) >= bdp);
        next.rounds(SLOW, secs(14));
        assert_eq!((next.bbr.min_rtt, next.probes), (SLOW, 0));
        // A lower sample still replaces it at once.
        assert_eq!(next.rounds(FAST, Duration::ZERO).min_rtt, FAST);
    }

    #[test]
    fn a_resumed_bandwidth_gives_way_to_the_connections_own_after_ten_rounds() {
        // The last connection saw ten times the bandwidth this one gets (eight datagrams a
        // round): the old estimate stands for BBR's ten-round window, then only this
        // connection's samples count (quinn's filter admits only samples above its maximum,
        // so a seeded one would have stood for the connection's whole life).
        let rtt = Duration::from_millis(20);
        let mut last = busy();
        last.rounds(rtt, secs(2));
        let mut model = last.bbr.path_model().expect("left STARTUP");
        let own = model.bandwidth;
        model.bandwidth *= 10;
        let mut next = resumed(model);
        next.rounds(rtt, rtt * 5);
        assert_eq!(next.bbr.max_bandwidth.get_estimate(), model.bandwidth);
        next.rounds(rtt, rtt * 12);
        assert_eq!(next.bbr.max_bandwidth.get_estimate(), own);
        assert_eq!(next.bbr.path_model().map(|m| m.bandwidth), Some(own));
    }

    #[test]
    fn a_connection_that_measured_nothing_passes_on_the_model_it_started_from() {
        // Application-limited throughout: no bandwidth sample of its own, so it passes on the
        // model it was resumed from, with the time that one was measured (so the model's age
        // counts from its measurement, however many idle connections carried it).
        let measured = Instant::now();
        let model = PathModel::for_tests(1_000_000, Duration::from_millis(20), measured);
        let mut next = resumed(model);
        next.app_limited = true;
        next.rounds(Duration::from_millis(20), secs(2));
        assert_eq!(next.bbr.max_bandwidth.measured(), 0);
        assert_eq!(next.bbr.path_model(), Some(model));
    }
}
