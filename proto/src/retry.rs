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

#[cfg(test)]
mod tests {
    use super::Retry;

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
