//! Retryable or terminal: the one way the project tells them apart, from a
//! failed attempt on the wire to a store error answered over HTTP.

use serde::{Deserialize, Serialize};

/// Whether trying the same thing again may succeed.
///
/// On the wire it encodes as the `bool` it replaced (`Terminal` 0, `Retryable`
/// 1), so the encoding of the messages that carry it did not change.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Retry {
    /// Trying again cannot help: the request, the command or the data is wrong.
    Terminal,
    /// A later try may succeed: a host, a link or a resource was unavailable for a while.
    Retryable,
}

impl Retry {
    /// `Retryable` when `retryable` holds, else `Terminal`.
    pub fn when(retryable: bool) -> Retry {
        if retryable { Retry::Retryable } else { Retry::Terminal }
    }

    /// Whether another try may succeed.
    pub fn is_retryable(self) -> bool {
        self == Retry::Retryable
    }
}

/// A failure that knows whether trying again may help.
pub trait Classify {
    /// Retryable or terminal.
    fn retry(&self) -> Retry;

    /// Whether another try may succeed.
    fn is_retryable(&self) -> bool {
        self.retry().is_retryable()
    }
}

/// Jittered exponential backoff between two bounds, for redialing a peer:
/// peers that lost each other together do not all come back at once.
#[derive(Clone, Debug)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// Waits from `min_ms` doubling up to `max_ms`; `seed` varies the jitter between peers.
    pub fn new(min_ms: u64, max_ms: u64, seed: u64) -> Backoff {
        let min_ms = min_ms.max(1);
        Backoff { min_ms, max_ms: max_ms.max(min_ms), failures: 0, rng: seed | 1 }
    }

    /// The longest wait.
    pub fn max_ms(&self) -> u64 {
        self.max_ms
    }

    /// The wait before the next try: up to `min * 2^failures`, at least half of it, within the bounds.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let ceiling = self.min_ms.saturating_mul(1u64 << self.failures.min(32)).min(self.max_ms);
        self.failures = self.failures.saturating_add(1);
        let floor = (ceiling / 2).max(self.min_ms).min(ceiling);
        // xorshift64: jitter only, no need for a real generator.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        std::time::Duration::from_millis(floor + self.rng % (ceiling - floor + 1))
    }

    /// After a success: the next wait starts from the minimum again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::{Backoff, Retry};

    #[test]
    fn backoff_grows_within_its_bounds_and_resets() {
        let mut b = Backoff::new(100, 1_000, 42);
        let delays: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!(delays.iter().all(|&d| (100..=1_000).contains(&d)), "{delays:?}");
        assert!(delays[6..].iter().all(|&d| d >= 500), "{delays:?}");
        b.reset();
        assert!(b.next_delay().as_millis() <= 100);
    }

    #[test]
    fn it_encodes_as_the_bool_it_replaced() {
        let config = bincode::config::standard();
        for (retry, flag) in [(Retry::Terminal, false), (Retry::Retryable, true)] {
            let a = bincode::serde::encode_to_vec(retry, config).unwrap();
            let b = bincode::serde::encode_to_vec(flag, config).unwrap();
            assert_eq!(a, b, "{retry:?}");
        }
    }
}
