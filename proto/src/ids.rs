//! Identifiers shared by the controller and agents.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let digits = s.strip_prefix($prefix).unwrap_or(s);
                digits.parse().map($name).map_err(|_| IdParseError {
                    input: s.to_string(),
                    expected: concat!($prefix, "<number>"),
                })
            }
        }
    };
}

numeric_id!(
    /// A job: one unit of work the user submitted. Never reused.
    JobId,
    "job-"
);
numeric_id!(
    /// One try of a job on one agent's GPUs. Never reused, across controller restarts too.
    AttemptId,
    "att-"
);
numeric_id!(
    /// The controller's generation: persisted and incremented at every start,
    /// so agents can refuse orders from a controller that has since restarted.
    Epoch,
    "epoch-"
);

/// An id string that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a valid id: expected {expected}")]
pub struct IdParseError {
    /// What was given.
    pub input: String,
    /// The form that was expected.
    pub expected: &'static str,
}

/// A SHA-256 digest naming a content-addressed artifact. In JSON it is 64 hex
/// digits; on the wire, 32 raw bytes.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(pub [u8; 32]);

impl Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() { serializer.collect_str(self) } else { self.0.serialize(serializer) }
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(Sha256)
        }
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| IdParseError { input: s.to_string(), expected: "64 hex digits" })?;
        Ok(Sha256(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_display_form() {
        let id = AttemptId(42);
        assert_eq!(id.to_string(), "att-42");
        assert_eq!("att-42".parse::<AttemptId>(), Ok(id));
        assert_eq!("42".parse::<AttemptId>(), Ok(id));
        assert!("job-x".parse::<JobId>().is_err());
        let digest = Sha256([0xab; 32]);
        assert_eq!(digest.to_string().parse::<Sha256>(), Ok(digest));
        assert!("abc".parse::<Sha256>().is_err());
    }
}
