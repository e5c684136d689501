//! Sweeps: one run per combination of parameter values, as `sbatch --array`
//! and `hq submit --array` make one task per index. `--seed 1..8` and
//! `--sweep seed=1..8,guidance=5,7` (repeatable) on `cosmos inference`; the
//! runs are submitted together, so a sweep is made whole or not at all.

use anyhow::bail;
use cosmos_controller::cosmos::{ParamError, Strength, TransferParams};

/// Most runs one sweep may make (its combinations, times the prompts, times
/// two with `--then-upscale`): a typo such as `seed=1..100000` is refused
/// rather than queued.
pub const SWEEP_RUNS_MAX: usize = 1_000;

/// A parameter a sweep may vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `--seed`.
    Seed,
    /// `--guidance`.
    Guidance,
    /// `--steps`.
    Steps,
    /// `--sigma-max`.
    SigmaMax,
    /// `--fps`.
    Fps,
    /// `--blur-strength`.
    BlurStrength,
    /// `--canny-threshold`.
    CannyThreshold,
}

/// Every parameter a sweep may vary, as its flag is spelt.
const PARAMS: [(&str, Param); 7] = [
    ("seed", Param::Seed),
    ("guidance", Param::Guidance),
    ("steps", Param::Steps),
    ("sigma-max", Param::SigmaMax),
    ("fps", Param::Fps),
    ("blur-strength", Param::BlurStrength),
    ("canny-threshold", Param::CannyThreshold),
];

impl Param {
    /// The name as its flag spells it (`sigma-max`).
    pub fn name(self) -> &'static str {
        PARAMS.iter().find(|(_, p)| *p == self).map(|(n, _)| *n).expect("every parameter is listed")
    }

    /// The parameter named `name` (`sigma-max` or `sigma_max`).
    fn parse(name: &str) -> Option<Param> {
        let name = name.replace('_', "-");
        PARAMS.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// Whether its values are whole numbers, which ranges step through by 1 unless told.
    fn whole(self) -> bool {
        matches!(self, Param::Seed | Param::Steps | Param::Fps)
    }

    fn numeric(self) -> bool {
        !matches!(self, Param::BlurStrength | Param::CannyThreshold)
    }

    /// Sets this parameter of `p` to `value`; the error says what `value` is not.
    pub fn apply(self, p: &mut TransferParams, value: &str) -> Result<(), String> {
        let whole = || value.parse::<u64>().map_err(|_| format!("`{value}` is not a whole number"));
        let number = || value.parse::<f64>().map_err(|_| format!("`{value}` is not a number"));
        let strength = || value.parse::<Strength>();
        match self {
            Param::Seed => p.seed = whole()?,
            Param::Guidance => p.guidance = number()?,
            Param::Steps => p.steps = u32::try_from(whole()?).map_err(|_| format!("`{value}` is too large"))?,
            Param::SigmaMax => p.sigma_max = number()?,
            Param::Fps => p.fps = u32::try_from(whole()?).map_err(|_| format!("`{value}` is too large"))?,
            Param::BlurStrength => p.blur_strength = strength()?,
            Param::CannyThreshold => p.canny_threshold = strength()?,
        }
        Ok(())
    }
}

/// One swept parameter and its values, with how the user gave it (for errors).
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// The parameter.
    pub param: Param,
    /// Its values, in the order given, ranges expanded.
    pub values: Vec<String>,
    /// `--seed` for the flag itself, `--sweep` for a `--sweep` entry.
    pub flag: &'static str,
}

/// Whether a flag's value asks for a sweep (`1..8`, `1,5,9`) rather than one value.
pub fn is_sweep(value: &str) -> bool {
    value.contains(',') || value.contains("..")
}

/// The axes of `--seed VALUES` (when a sweep) and of each `--sweep P=V,V,Q=V…`.
pub fn axes(seed: Option<&str>, sweeps: &[String]) -> anyhow::Result<Vec<Axis>> {
    let mut axes: Vec<Axis> = Vec::new();
    if let Some(seed) = seed.filter(|s| is_sweep(s)) {
        axes.push(Axis { param: Param::Seed, values: expand(Param::Seed, seed, "--seed")?, flag: "--seed" });
    }
    for text in sweeps {
        // `seed=1..8,guidance=5,7`: an item with `=` starts a parameter, the items after it add values.
        let mut current: Option<(Param, String)> = None;
        let mut entries: Vec<(Param, String)> = Vec::new();
        for item in text.split(',') {
            match item.split_once('=') {
                Some((name, value)) => {
                    let param = Param::parse(name.trim()).ok_or_else(|| {
                        let names: Vec<&str> = PARAMS.iter().map(|(n, _)| *n).collect();
                        anyhow::anyhow!(
                            "--sweep {text}: `{name}` is not a parameter a sweep can vary; these can: {}",
                            names.join(", ")
                        )
                    })?;
                    entries.extend(current.take());
                    current = Some((param, value.trim().to_string()));
                }
                None => match &mut current {
                    Some((_, values)) => {
                        values.push(',');
                        values.push_str(item.trim());
                    }
                    None => bail!("--sweep {text}: give PARAM=VALUES, e.g. `seed=1..8` or `seed=1..8,guidance=5,7`"),
                },
            }
        }
        entries.extend(current);
        for (param, values) in entries {
            if values.split(',').any(|v| v.trim().is_empty()) {
                bail!("--sweep {text}: `{}` has an empty value", param.name());
            }
            axes.push(Axis { param, values: expand(param, &values, "--sweep")?, flag: "--sweep" });
        }
    }
    for (i, a) in axes.iter().enumerate() {
        if axes[..i].iter().any(|b| b.param == a.param) {
            bail!("{} is swept twice ({} and an earlier flag); give its values once", a.param.name(), a.flag);
        }
    }
    Ok(axes)
}

/// The values `text` lists: `A,B,…`, each of which may be a range `A..B` or
/// `A..B:STEP` (both ends included; whole numbers step by 1 unless told).
fn expand(param: Param, text: &str, flag: &str) -> anyhow::Result<Vec<String>> {
    let at = |msg: String| anyhow::anyhow!("{flag} {}={text}: {msg}", param.name());
    let mut values = Vec::new();
    for item in text.split(',').map(str::trim) {
        let Some((from, rest)) = item.split_once("..") else {
            values.push(item.to_string());
            continue;
        };
        if !param.numeric() {
            return Err(at(format!("`{item}`: a range needs numbers; list the levels (`low,high`)")));
        }
        let (to, step) = match rest.split_once(':') {
            Some((to, step)) => (to, Some(step)),
            None => (rest, None),
        };
        let number = |s: &str| s.trim().parse::<f64>().map_err(|_| at(format!("`{s}` in `{item}` is not a number")));
        let (a, b) = (number(from)?, number(to)?);
        let step = match step {
            Some(s) => number(s)?,
            None => 1.0,
        };
        if param.whole() && [a, b, step].iter().any(|v| v.fract() != 0.0) {
            return Err(at(format!("`{item}`: {} takes whole numbers", param.name())));
        }
        if step <= 0.0 || b < a || !step.is_finite() {
            return Err(at(format!("`{item}` is no range: give A..B with A ≤ B (and a step above 0, A..B:STEP)")));
        }
        // Counted before it is made, so `1..4000000000` costs nothing.
        let count = ((b - a) / step + 1e-9).floor() + 1.0;
        if count > SWEEP_RUNS_MAX as f64 {
            return Err(at(format!("`{item}` is {count} values; a sweep makes at most {SWEEP_RUNS_MAX} runs")));
        }
        for i in 0..count as u64 {
            let v = a + i as f64 * step;
            // Rounded, so that 5..6:0.1 gives 5.3, not 5.300000000000001.
            values.push(format!("{}", (v * 1e6).round() / 1e6));
        }
    }
    Ok(values)
}

/// Every combination of `axes` applied to `base`, each checked against the
/// contract's ranges; with its label (`seed=3 guidance=7`). The first value of
/// the first axis varies slowest. The error names the flag and the value.
pub fn combinations(
    base: &TransferParams,
    axes: &[Axis],
    flag_error: impl Fn(&ParamError) -> anyhow::Error,
) -> anyhow::Result<Vec<(String, TransferParams)>> {
    // Each value alone first, so the error names it.
    for axis in axes {
        for v in &axis.values {
            let mut p = base.clone();
            let name = axis.param.name();
            axis.param.apply(&mut p, v).map_err(|e| anyhow::anyhow!("{} {name}: {e}", axis.flag))?;
            p.validate().map_err(|e| match axis.flag {
                "--sweep" => anyhow::anyhow!("--sweep {name}={v}: {}", flag_error(&e)),
                _ => flag_error(&e),
            })?;
        }
    }
    let mut out = vec![(String::new(), base.clone())];
    for axis in axes {
        let mut next = Vec::with_capacity(out.len() * axis.values.len());
        for (label, p) in &out {
            for v in &axis.values {
                let mut p = p.clone();
                axis.param.apply(&mut p, v).expect("checked above");
                let sep = if label.is_empty() { "" } else { " " };
                next.push((format!("{label}{sep}{}={v}", axis.param.name()), p));
            }
        }
        out = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(e: &ParamError) -> anyhow::Error {
        anyhow::anyhow!("--{} {}", e.param, e.problem)
    }

    #[test]
    fn ranges_and_lists_expand_in_order() {
        let a = axes(Some("1..4"), &["guidance=5,7.5".into(), "sigma-max=10..12:1,70".into()]).unwrap();
        assert_eq!(a[0].values, ["1", "2", "3", "4"]);
        assert_eq!(a[1].values, ["5", "7.5"]);
        assert_eq!(a[2].values, ["10", "11", "12", "70"]);
        assert_eq!(expand(Param::Guidance, "5..6:0.25", "--sweep").unwrap(), ["5", "5.25", "5.5", "5.75", "6"]);
        let one = axes(Some("7"), &[]).unwrap();
        assert!(one.is_empty(), "one seed is no sweep");
        let runs = combinations(&TransferParams::default(), &a, flag).unwrap();
        assert_eq!(runs.len(), 4 * 2 * 4);
        assert_eq!(runs[0].0, "seed=1 guidance=5 sigma-max=10");
        assert_eq!((runs[1].1.seed, runs[1].1.sigma_max), (1, 11.0));
        assert_eq!(runs.last().unwrap().0, "seed=4 guidance=7.5 sigma-max=70");
    }

    #[test]
    fn bad_sweeps_are_refused_naming_the_flag() {
        let err = |seed: Option<&str>, sweeps: &[&str]| {
            let sweeps: Vec<String> = sweeps.iter().map(|s| s.to_string()).collect();
            match axes(seed, &sweeps).and_then(|a| combinations(&TransferParams::default(), &a, flag)) {
                Ok(r) => panic!("{seed:?} {sweeps:?} made {} runs", r.len()),
                Err(e) => e.to_string(),
            }
        };
        assert!(err(Some("0..3"), &[]).starts_with("--seed must be between 1 and"), "{}", err(Some("0..3"), &[]));
        let e = err(None, &["guidance=5,70"]);
        assert!(e.starts_with("--sweep guidance=70: --guidance must be between 1 and 20"), "{e}");
        assert!(err(None, &["temperature=1,2"]).contains("`temperature` is not a parameter"));
        assert!(err(None, &["1,2"]).contains("give PARAM=VALUES"));
        assert!(err(Some("1..3"), &["seed=4"]).contains("seed is swept twice"));
        assert!(err(None, &["steps=1.5..3"]).contains("takes whole numbers"));
        assert!(err(None, &["steps=9..3"]).contains("is no range"));
        assert!(err(None, &["blur-strength=low..high"]).contains("a range needs numbers"));
        assert!(err(None, &["blur-strength=low,loud"]).contains("loud"));
        let e = err(Some("1..4000000000"), &[]);
        assert!(e.contains(&format!("at most {SWEEP_RUNS_MAX} runs")), "{e}");
        assert!(err(None, &["seed=1,,2"]).contains("empty value"));
    }
}
