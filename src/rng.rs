//! A fast per-thread random generator for what needs spread, not secrecy (load-balancer draws,
//! trace ids): xorshift64*, seeded once per thread from the system RNG, so the request path
//! makes no `getrandom` call.

use std::cell::Cell;

/// A uniform 64-bit number.
pub(crate) fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use ring::rand::SecureRandom;
            let mut b = [0u8; 8];
            if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
                // Never seen on Linux; the clock still differs between threads and runs.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64;
                b = nanos.to_le_bytes();
            }
            u64::from_le_bytes(b) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A uniform number in [0, 1).
pub(crate) fn random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}
