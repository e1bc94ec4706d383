//! Durations in config files are text with a unit: `"500ms"`, `"4s"`, `"1m30s"` is
//! not accepted (one number, one unit) so a value reads the same everywhere.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

const UNITS: [(&str, u128); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses `"<digits><unit>"` with unit one of `ns`, `us`, `ms`, `s`, `m`, `h`, `d`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a duration: expected a whole number and a unit, e.g. \"500ms\" or \"4s\""
        ));
    }
    let nanos_per_unit = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, n)| *n)
        .ok_or_else(|| format!("{text:?} has no valid unit: use one of ns, us, ms, s, m, h, d (e.g. \"500ms\")"))?;
    let count: u128 = digits.parse().map_err(|_| format!("{text:?} is too large"))?;
    let nanos = count
        .checked_mul(nanos_per_unit)
        .filter(|n| *n <= u64::MAX as u128)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(Duration::from_nanos(nanos as u64))
}

/// Formats with the largest unit that represents `d` exactly: 500ms, 4s, 2m.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let (name, per) = UNITS.iter().find(|(_, per)| nanos.is_multiple_of(*per)).copied().unwrap_or(("ns", 1));
    format!("{}{name}", nanos / per)
}

/// serde `serialize_with`.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// serde `deserialize_with`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("7us"), Ok(Duration::from_micros(7)));
        assert_eq!(parse("9ns"), Ok(Duration::from_nanos(9)));
    }

    #[test]
    fn rejects_with_a_hint() {
        for bad in ["", "5", "ms", "5 parsecs", "-1s", "1.5s", "99999999999999999999999h"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("duration") || err.contains("unit") || err.contains("large"), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn format_round_trips(nanos in any::<u64>()) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
