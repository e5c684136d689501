//! `cosmos jobs prune --before DATE`: removes finished jobs that ended before
//! DATE, with their attempts' logs, and the blobs nothing references any more.

use crate::client::{Client, ClientArgs};
use cosmos_controller::retention::Pruned;

/// `--before`: `2026-01-31` (midnight UTC), `2026-01-31T12:00:00Z`, a
/// duration back from now (`90m`, `6h`, `30d`) or ms since the Unix epoch.
pub fn before_ms(text: &str, now_ms: u64) -> anyhow::Result<u64> {
    let bad = || {
        anyhow::anyhow!(
            "--before {text}: give a date (2026-01-31, or 2026-01-31T12:00:00Z, UTC), a duration back from now (90m, 6h, 30d) or ms since the Unix epoch"
        )
    };
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    if let Some(unit_ms) = text.chars().last().and_then(|u| match u {
        's' => Some(1_000u64),
        'm' => Some(60_000),
        'h' => Some(3_600_000),
        'd' => Some(86_400_000),
        _ => None,
    }) && let Ok(n) = text[..text.len() - 1].parse::<u64>()
    {
        return Ok(now_ms.saturating_sub(n.saturating_mul(unit_ms)));
    }
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (text, None),
    };
    let ymd: Vec<&str> = date.split('-').collect();
    let [y, m, d] = ymd[..] else { return Err(bad()) };
    let (y, m, d): (i64, u32, u32) =
        (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if let Some(t) = time {
        let hms: Vec<&str> = t.split(':').collect();
        let [h, mi, s] = hms[..] else { return Err(bad()) };
        let (h, mi, s): (i64, i64, i64) =
            (h.parse().map_err(|_| bad())?, mi.parse().map_err(|_| bad())?, s.parse().map_err(|_| bad())?);
        if h > 23 || mi > 59 || s > 60 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + s;
    }
    Ok(u64::try_from(secs).map_err(|_| bad())? * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Asks the controller to prune and says what went.
pub fn prune(args: &ClientArgs, before: &str) -> anyhow::Result<()> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let before_ms = before_ms(before, now_ms)?;
    let client = Client::new(args)?;
    let pruned: Pruned = client.post(&format!("/v1/jobs/prune?before_ms={before_ms}"), &serde_json::json!({}))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pruned)?);
        return Ok(());
    }
    println!(
        "pruned {} finished jobs that ended before {before} ({} attempts, {} log files, {} MiB of logs); collected {} blobs nothing references ({} MiB)",
        pruned.jobs.len(),
        pruned.attempts,
        pruned.log_files,
        pruned.log_bytes >> 20,
        pruned.blobs,
        pruned.blob_bytes >> 20
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_durations_and_milliseconds() {
        assert_eq!(before_ms("1970-01-02", 0).unwrap(), 86_400_000);
        assert_eq!(before_ms("2026-01-31", 0).unwrap(), 1_769_817_600_000);
        assert_eq!(before_ms("2026-01-31T12:00:30Z", 0).unwrap(), 1_769_817_600_000 + 43_230_000);
        assert_eq!(before_ms("2024-03-01", 0).unwrap() - before_ms("2024-02-28", 0).unwrap(), 2 * 86_400_000);
        assert_eq!(before_ms("30d", 100 * 86_400_000).unwrap(), 70 * 86_400_000);
        assert_eq!(before_ms("90m", 10_000_000).unwrap(), 10_000_000 - 5_400_000);
        assert_eq!(before_ms("1234", 0).unwrap(), 1234);
        for bad in ["yesterday", "2026-13-01", "2026-01-31T12:00", "2026/01/31", "5w"] {
            let e = before_ms(bad, 0).unwrap_err().to_string();
            assert!(e.contains(&format!("--before {bad}:")), "{e}");
        }
    }
}
