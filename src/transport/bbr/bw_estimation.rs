//! From quinn-proto 0.11.19's `congestion::bbr` (MIT OR Apache-2.0), unchanged but for imports,
//! a `let … else` and the resumed estimate (`resume`);
//! see `super`.

use std::fmt::{Debug, Display, Formatter};

use super::min_max::MinMax;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
pub(crate) struct BandwidthEstimation {
    total_acked: u64,
    prev_total_acked: u64,
    acked_time: Option<Instant>,
    prev_acked_time: Option<Instant>,
    total_sent: u64,
    prev_total_sent: u64,
    sent_time: Option<Instant>,
    prev_sent_time: Option<Instant>,
    max_filter: MinMax,
    acked_at_last_window: u64,
    /// A previous connection's estimate and the round it stands until (`resume`).
    resumed: Option<(u64, u64)>,
}

impl BandwidthEstimation {
    pub(crate) fn on_sent(&mut self, now: Instant, bytes: u64) {
        self.prev_total_sent = self.total_sent;
        self.total_sent += bytes;
        self.prev_sent_time = self.sent_time;
        self.sent_time = Some(now);
    }

    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        _sent: Instant,
        bytes: u64,
        round: u64,
        app_limited: bool,
    ) {
        self.prev_total_acked = self.total_acked;
        self.total_acked += bytes;
        self.prev_acked_time = self.acked_time;
        self.acked_time = Some(now);

        let Some(prev_sent_time) = self.prev_sent_time else {
            return;
        };

        let send_rate = match self.sent_time {
            Some(sent_time) if sent_time > prev_sent_time => Self::bw_from_delta(
                self.total_sent - self.prev_total_sent,
                sent_time - prev_sent_time,
            )
            .unwrap_or(0),
            _ => u64::MAX, // will take the min of send and ack, so this is just a skip
        };

        let ack_rate = match self.prev_acked_time {
            Some(prev_acked_time) => Self::bw_from_delta(
                self.total_acked - self.prev_total_acked,
                now - prev_acked_time,
            )
            .unwrap_or(0),
            None => 0,
        };

        let bandwidth = send_rate.min(ack_rate);
        if !app_limited && self.max_filter.get() < bandwidth {
            self.max_filter.update_max(round, bandwidth);
        }
    }

    /// Starts from a previous connection's estimate (quicar's addition): it stands under this
    /// connection's own for its first `rounds` rounds, then only this connection's samples
    /// count. It is kept apart from the filter because the filter admits only samples above
    /// its maximum: a seeded maximum would never give way.
    pub(crate) fn resume(&mut self, bandwidth: u64, rounds: u64) {
        self.resumed = Some((bandwidth, rounds));
    }

    /// This connection's own estimate, without a resumed one.
    pub(crate) fn measured(&self) -> u64 {
        self.max_filter.get()
    }

    pub(crate) fn bytes_acked_this_window(&self) -> u64 {
        self.total_acked - self.acked_at_last_window
    }

    pub(crate) fn end_acks(&mut self, current_round: u64, _app_limited: bool) {
        self.acked_at_last_window = self.total_acked;
        if self
            .resumed
            .is_some_and(|(_, until)| current_round >= until)
        {
            self.resumed = None;
        }
    }

    pub(crate) fn get_estimate(&self) -> u64 {
        let own = self.max_filter.get();
        self.resumed.map_or(own, |(resumed, _)| resumed.max(own))
    }

    pub(crate) const fn bw_from_delta(bytes: u64, delta: Duration) -> Option<u64> {
        let window_duration_ns = delta.as_nanos();
        if window_duration_ns == 0 {
            return None;
        }
        let b_ns = bytes * 1_000_000_000;
        let bytes_per_second = b_ns / (window_duration_ns as u64);
        Some(bytes_per_second)
    }
}

impl Display for BandwidthEstimation {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} MB/s",
            self.get_estimate() as f32 / (1024 * 1024) as f32
        )
    }
}
