//! tqdm-style progress bars, as the diffusion loop prints them.

use std::time::Duration;

/// Bar cells: tqdm's width when stderr is not a terminal.
const BAR_CELLS: usize = 10;
/// tqdm's partial-cell glyphs, in eighths.
const PARTIAL_GLYPHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

/// One bar, e.g. `" 34%|███▍      | 12/35 [00:01<00:02, 10.00it/s]"`, without its line ending.
pub(crate) fn tqdm_line(desc: &str, n: u64, total: u64, elapsed: Duration) -> String {
    let frac = if total == 0 { 1.0 } else { (n.min(total) as f64) / (total as f64) };
    let eighths = (frac * (BAR_CELLS * 8) as f64) as usize;
    let (full, part) = (eighths / 8, eighths % 8);
    let mut bar: String = "█".repeat(full);
    if full < BAR_CELLS {
        bar.push(PARTIAL_GLYPHS[part]);
        bar.push_str(&" ".repeat(BAR_CELLS - full - 1));
    }
    let secs = elapsed.as_secs_f64();
    let (remaining, rate) = if n == 0 || secs <= 0.0 {
        ("?".to_string(), "?it/s".to_string())
    } else {
        let per_sec = n as f64 / secs;
        let rate = if per_sec >= 1.0 { format!("{per_sec:.2}it/s") } else { format!("{:.2}s/it", 1.0 / per_sec) };
        (interval((total.saturating_sub(n)) as f64 / per_sec), rate)
    };
    let prefix = if desc.is_empty() { String::new() } else { format!("{desc}: ") };
    format!("{prefix}{:3.0}%|{bar}| {n}/{total} [{}<{remaining}, {rate}]", frac * 100.0, interval(secs))
}

/// tqdm's `format_interval`: `MM:SS`, or `H:MM:SS` from an hour on.
fn interval(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 { format!("{h}:{m:02}:{s:02}") } else { format!("{m:02}:{s:02}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_look_like_tqdm() {
        assert_eq!(tqdm_line("", 0, 35, Duration::ZERO), "  0%|          | 0/35 [00:00<?, ?it/s]");
        assert_eq!(
            tqdm_line("", 12, 35, Duration::from_millis(1200)),
            " 34%|███▍      | 12/35 [00:01<00:02, 10.00it/s]"
        );
        assert_eq!(
            tqdm_line("", 35, 35, Duration::from_secs(3700)),
            "100%|██████████| 35/35 [1:01:40<00:00, 105.71s/it]"
        );
        assert!(tqdm_line("Processed prompts", 1, 2, Duration::from_secs(1)).starts_with("Processed prompts:  50%|"));
    }
}
